"""Benchmark: a shared FFN in a `lax.scan` of n iterations, training step (value and grad).

Compares XLA (plain jnp reference), XLA + `jax.checkpoint`, and the fused Pallas kernel
(compiled on GPU/TPU, interpret mode on CPU): forward / backward / total time, TFLOP/s against
the card's peak, and memory (`compiled.memory_analysis()`, on GPU also `memory_stats()`), with
ratios to both baselines. Checks every implementation against the reference before timing.

    python benchmarks/ffn.py            # the device's default sizes (CPU: finishes in minutes)
    python benchmarks/ffn.py --small    # tiny sizes, a smoke test
    python benchmarks/ffn.py --full     # d=1024, H=4096, bf16, n in {1,4,16}, M up to 65536
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tietransform import kernels  # noqa: E402


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 spec; None where unknown (CPU).


def _peak(device) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if name in device.device_kind:
            return peak
    return None


def _params(d, h, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "w1": jax.random.normal(k[0], (d, h)) / np.sqrt(d),
        "b1": jnp.zeros((h,)),
        "w2": jax.random.normal(k[1], (h, d)) / np.sqrt(h),
        "b2": jnp.zeros((d,)),
    }


def _loss(n, dtype, impl):
    def loss(p, x):
        c = {k: v.astype(dtype) for k, v in p.items()}  # cast inside: dW accumulates in f32

        def body(carry, _):
            y = kernels.ffn(
                carry.astype(dtype), c["w1"], c["b1"], c["w2"], c["b2"], implementation=impl
            )
            return carry + y.astype(jnp.float32), None

        out, _ = lax.scan(body, x, None, length=n)
        return jnp.mean(out * out)

    return loss


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _check(loss, ref_loss, p, x, dtype):
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    g = jax.jit(jax.grad(loss))(p, x)
    r = jax.jit(jax.grad(ref_loss))(p, x)
    for name in g:
        a, b = np.asarray(g[name]), np.asarray(r[name])
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
        if not err <= tol:
            raise AssertionError(f"gradient of {name} off by {err:.3g} (> {tol}); not timing")


def run_case(n, m, d, h, dtype, kernel_impl, reps):
    device = jax.devices()[0]
    p, x = _params(d, h), jax.random.normal(jax.random.key(1), (m, d))
    impls = {"xla": "xla", "xla_remat": "xla_remat", "kernel": kernel_impl}
    ref_loss = _loss(n, dtype, "xla")
    flops_fwd = n * 4 * m * d * h
    flops_step = n * 12 * m * d * h  # model FLOPs: forward 4, backward 8 (recompute not counted)
    row = {"n": n, "tokens": m, "d": d, "hidden": h, "dtype": jnp.dtype(dtype).name}
    for name, impl in impls.items():
        loss = _loss(n, dtype, impl)
        if name != "xla":
            _check(loss, ref_loss, p, x, dtype)
        fwd = jax.jit(loss)
        step = jax.jit(jax.value_and_grad(loss))
        compiled = step.lower(p, x).compile()
        mem = compiled.memory_analysis()
        t_fwd = _time(fwd, p, x, reps=reps)
        t_step = _time(step, p, x, reps=reps)
        entry = {
            "forward_s": t_fwd,
            "backward_s": max(t_step - t_fwd, 0.0),
            "total_s": t_step,
            "forward_tflops": flops_fwd / t_fwd / 1e12,
            "total_tflops": flops_step / t_step / 1e12,
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
        }
        peak = _peak(device)
        if peak:
            entry["total_fraction_of_peak"] = entry["total_tflops"] / peak
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            entry["peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
        row[name] = entry
    for base in ("xla", "xla_remat"):
        row[f"kernel_vs_{base}"] = {
            "temp_bytes": row["kernel"]["temp_bytes"] / max(row[base]["temp_bytes"], 1),
            "total_s": row["kernel"]["total_s"] / row[base]["total_s"],
        }
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--full", action="store_true", help="d=1024, H=4096, bf16, the GPU sizes")
    ap.add_argument("--n", type=int, nargs="*")
    ap.add_argument("--tokens", type=int, nargs="*")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if args.small:
        ns, ms, d, h, dtype = [1, 4], [512], 128, 512, jnp.float32
    elif args.full or not on_cpu:
        ns, ms, d, h, dtype = [1, 4, 16], [4096, 16384, 65536], 1024, 4096, jnp.bfloat16
    else:  # CPU default: DESIGN.md's prototype size (d=256, H=1024, f32), a few minutes.
        ns, ms, d, h, dtype = [1, 4, 8], [1024, 4096], 256, 1024, jnp.float32
    ns, ms = args.n or ns, args.tokens or ms
    kernel_impl = "interpret" if on_cpu else "pallas"
    print(
        f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
        f"dtype {jnp.dtype(dtype).name}; d={d} H={h}; kernel = {kernel_impl}",
        flush=True,
    )
    rows = []
    for m in ms:
        for n in ns:
            row = run_case(n, m, d, h, dtype, kernel_impl, args.reps)
            rows.append(row)
            mib = {k: row[k]["temp_bytes"] / 2**20 for k in ("xla", "xla_remat", "kernel")}
            print(
                f"n={n:2d} M={m:6d}  temp MiB  xla {mib['xla']:9.1f}  remat "
                f"{mib['xla_remat']:8.1f}  kernel {mib['kernel']:8.1f}   total s  xla "
                f"{row['xla']['total_s']:.3f}  remat {row['xla_remat']['total_s']:.3f}  "
                f"kernel {row['kernel']['total_s']:.3f}",
                flush=True,
            )
    name = device.device_kind.replace(" ", "_").lower() if not on_cpu else "cpu"
    out = args.out or pathlib.Path(__file__).parent / "results" / f"ffn_{name}.json"
    out.write_text(
        json.dumps(
            {
                "device": device.device_kind,
                "platform": device.platform,
                "jax": jax.__version__,
                "kernel": kernel_impl,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The device script: every Mosaic GPU `TuningConfig` against its rivals, side by side, one process.

A training step (`value_and_grad` of a `lax.scan` of n residual iterations `x <- x + ffn(x)` of
one shared FFN, the FFN in bf16, the residual stream in f32) for each implementation:

- `kernel[<config>]`: `kernels.ffn`/`kernels.gated_ffn` compiled with each of `kernels.ffn.CONFIGS`;
- `xla`, `xla_remat` (XLA + `jax.checkpoint`);
- `xla_chunked`: a scan over hidden chunks with a recomputing `custom_vjp`, cuBLAS doing the
  matmuls (what the kernel's memory saving costs without a kernel);
- `tokamax` (gated only, where `tokamax` imports): `tokamax.gated_linear_unit` plus an XLA
  down projection.

Weights are stored float32 and cast to bf16 in the step (`f32->bf16`), or stored bf16 (`bf16`).
Each implementation's gradients are checked against the float32 reference first (a wrong one is
a row saying so, never timed); then the median of `--steps` (>= 10) steps after two warm-up
steps. Reported: ms, model TFLOP/s (3 x the forward's matmul FLOPs per iteration; recomputation
not counted), % of the 989 TFLOP/s dense bf16 peak of an H100/H200, temp memory
(`memory_analysis().temp_size_in_bytes`), the program's peak (arguments + outputs + temp -
aliased) and, on GPU, the process's device high-water mark. A case that runs out of memory is a
row saying so.

The gradient check. `grad_err` is the worst normwise relative error over the gradients,
`||g - r||_2 / ||r||_2` per leaf (parameters and `x`), against the float32 reference (its
matmuls at `float32` precision, not TF32). What bf16 rounding alone does to it depends on the
problem: each iteration's rounding is carried through the later ones, and the gated residual
`x + (silu(x W) * (x U)) W_out` grows quadratically, so its scan of 8 iterations is badly
conditioned (on CPU at 1024 tokens, d=1024, H=4096: gradients of order 1e16, and XLA's own bf16
step 0.12 off normwise, 0.013 for the plain FFN). A fixed bar cannot serve both. So each case
and storage measures its own yardstick first, `rounding_err`: the reference run again on inputs
(parameters and `x`) that each carry a relative error drawn uniformly from +-2^-8, bf16's unit
roundoff, compared with the unperturbed reference by the same norm. That is how far rounding the
inputs to bf16 moves the gradients, amplification by the iterations included. A bf16 step rounds
more than its inputs (each iteration's carry, hidden activation, output and cotangents), so the
bar is `grad_tol = 4 x rounding_err`: on CPU at the shapes above, XLA's bf16 step came to
0.7-0.9x its `rounding_err`, plain and gated, both storages. A row above the bar is `WRONG` and
not timed. Where the problem is that badly conditioned the bar is loose (about 0.5 for the gated
case above), so there the check catches only errors of the order of the gradients themselves;
`tests/kernels` checks every config tightly on well-conditioned problems.

Rows are written as they finish (JSON and markdown). On the H200 of 2026-12-04 a case and
storage took about 65 s at 16384 tokens x 8 and about 157 s at 65536 x 4 (compiles, checks and
timings of every implementation), so the first four cases alone take about 15 minutes and the
whole list far longer. `--budget-s` bounds a run: once it is spent, the remaining
implementations, storages and cases are rows saying "skipped: time budget spent" (a row in
progress finishes first), so a time-limited device slot always leaves a table.

    python benchmarks/ffn_device.py                  # one H200, 330 s budget: the 16384 x 8 cases
    python benchmarks/ffn_device.py --budget-s 900   # one H200: the first four cases, ~15 minutes
    python benchmarks/ffn_device.py --dry-run        # CPU: the Mosaic GPU interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tietransform import kernels  # noqa: E402
from tietransform.kernels.ffn import CONFIGS  # noqa: E402


PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16.
BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significand bits: rounding to nearest errs by at most 2^-8.
GRAD_TOL_FACTOR = 4.0  # the bar over `rounding_err` (see the module docstring).
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# (kind, tokens, n) in priority order: the 2026-11-30 measurement's shapes first.
DEVICE_CASES = [
    ("ffn", 16384, 8),
    ("gated_ffn", 16384, 8),
    ("ffn", 65536, 4),
    ("gated_ffn", 65536, 4),
    ("ffn", 16384, 1),
    ("gated_ffn", 16384, 1),
    ("ffn", 16384, 16),
    ("gated_ffn", 16384, 16),
]
DRY_CASES = [("ffn", 40, 2), ("gated_ffn", 40, 2)]


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # "ffn" or "gated_ffn"
    tokens: int
    n: int
    d: int
    hidden: int

    @property
    def arity(self) -> int:
        return 2 if self.kind == "gated_ffn" else 1

    def model_flops(self) -> float:
        """Matmul FLOPs of a training step: 3 x forward, n iterations."""
        forward = 2 * self.tokens * self.hidden * self.d * (self.arity + 1)
        return 3.0 * self.n * forward


def _params(shape: Shape) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.key(0), 4)
    d, h = shape.d, shape.hidden
    p = {
        "w1": jax.random.normal(ks[0], (d, h)) / np.sqrt(d),
        "w2": jax.random.normal(ks[1], (h, d)) / np.sqrt(h),
        "b2": jnp.zeros((d,)),
    }
    if shape.arity == 2:  # no gate/up biases: tokamax's gated linear unit has none.
        p["wu"] = jax.random.normal(ks[3], (d, h)) / np.sqrt(d)
    else:
        p["b1"] = jax.random.normal(ks[2], (h,)) * 0.1
    return p


def _chunked(phi: Callable, chunk: int):
    """`phi(x W + b) @ W_out + b_out` as a scan over hidden chunks whose backward recomputes
    each chunk (a `custom_vjp` saving only the inputs): XLA's own matmuls, the kernel's memory."""

    def chunk_out(x, ws_c, bs_c, w_out_c):
        zs = [
            jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
            for w, b in zip(ws_c, bs_c, strict=True)
        ]
        h = phi(*zs).astype(x.dtype)
        return jnp.dot(h, w_out_c, preferred_element_type=jnp.float32)

    def split(ws, bs, w_out):
        k = ws[0].shape[1] // chunk
        ws_s = tuple(w.reshape(w.shape[0], k, chunk).transpose(1, 0, 2) for w in ws)
        bs_s = tuple(b.reshape(k, chunk) for b in bs)
        return ws_s, bs_s, w_out.reshape(k, chunk, w_out.shape[1])

    @jax.custom_vjp
    def ffn(x, ws, bs, w_out, b_out):
        def step(acc, c):
            return acc + chunk_out(x, *c), None

        acc0 = jnp.zeros((x.shape[0], w_out.shape[1]), jnp.float32) + b_out.astype(jnp.float32)
        out, _ = lax.scan(step, acc0, split(ws, bs, w_out))
        return out.astype(x.dtype)

    def fwd(x, ws, bs, w_out, b_out):
        return ffn(x, ws, bs, w_out, b_out), (x, ws, bs, w_out, b_out)

    def bwd(res, g):
        x, ws, bs, w_out, b_out = res
        g32 = g.astype(jnp.float32)

        def step(dx, c):
            _, pull = jax.vjp(chunk_out, x, *c)
            dx_c, dws_c, dbs_c, dw_out_c = pull(g32)
            return dx + dx_c.astype(jnp.float32), (dws_c, dbs_c, dw_out_c)

        dx, (dws_s, dbs_s, dw_out_s) = lax.scan(
            step, jnp.zeros(x.shape, jnp.float32), split(ws, bs, w_out)
        )
        dws = tuple(dw.transpose(1, 0, 2).reshape(w.shape) for dw, w in zip(dws_s, ws, strict=True))
        dbs = tuple(db.reshape(b.shape) for db, b in zip(dbs_s, bs, strict=True))
        db_out = jnp.sum(g32, 0).astype(b_out.dtype)
        return dx.astype(x.dtype), dws, dbs, dw_out_s.reshape(w_out.shape), db_out

    ffn.defvjp(fwd, bwd)
    return ffn


def _tokamax_glu() -> Callable | None:
    try:
        import tokamax  # noqa: PLC0415  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None
    return tokamax.gated_linear_unit


def _ffn_fn(shape: Shape, impl: str, *, interpret: bool, chunk: int) -> Callable:
    """`ffn(c, x)` for cast parameters `c` and `x` in bf16, by `impl`."""
    act = jax.nn.silu if shape.arity == 2 else jax.nn.gelu
    kernel_kw: dict[str, Any] = {}
    if impl.startswith("kernel["):
        config = CONFIGS[impl[len("kernel[") : -1]]
        kernel_kw = dict(
            implementation="interpret" if interpret else "pallas", backend="gpu", config=config
        )
    elif impl in ("xla", "xla_remat", "reference"):
        # The float32 reference recomputes too (jax.checkpoint): it must fit where XLA does not.
        kernel_kw = dict(implementation="xla" if impl == "xla" else "xla_remat")
    if kernel_kw:
        if shape.arity == 2:
            return lambda c, x: kernels.gated_ffn(
                x, c["w1"], c["wu"], c["w2"], b2=c["b2"], activation=act, **kernel_kw
            )
        return lambda c, x: kernels.ffn(
            x, c["w1"], c["b1"], c["w2"], c["b2"], activation=act, **kernel_kw
        )
    if impl == "xla_chunked":
        if shape.arity == 2:
            fused = _chunked(lambda g, u: act(g) * u, chunk)
            zero = jnp.zeros((shape.hidden,), jnp.bfloat16)
            return lambda c, x: fused(x, (c["w1"], c["wu"]), (zero, zero), c["w2"], c["b2"])
        fused = _chunked(act, chunk)
        return lambda c, x: fused(x, (c["w1"],), (c["b1"],), c["w2"], c["b2"])
    if impl == "tokamax":
        glu = _tokamax_glu()
        assert glu is not None

        def tok(c, x):
            h = glu(x, jnp.stack([c["w1"], c["wu"]], axis=1), activation=act)
            return (jnp.dot(h, c["w2"], preferred_element_type=jnp.float32) + c["b2"]).astype(
                x.dtype
            )

        return tok
    raise ValueError(f"unknown implementation {impl!r}")


def _step(shape: Shape, impl: str, storage: str, *, interpret: bool, chunk: int) -> Any:
    """`value_and_grad` of the scan'd loss, parameters stored per `storage`. The `reference`
    computes in float32 with float32 matmuls (a GPU's default precision for float32 is TF32)."""
    ffn = _ffn_fn(shape, impl, interpret=interpret, chunk=chunk)
    dtype = jnp.float32 if impl == "reference" else jnp.bfloat16
    cot = jax.random.normal(jax.random.key(7), (shape.tokens, shape.d))

    def loss(p, x):
        c = {k: v.astype(dtype) for k, v in p.items()}

        def body(carry, _):
            return carry + ffn(c, carry.astype(dtype)).astype(jnp.float32), None

        out, _ = lax.scan(body, x, None, length=shape.n)
        return jnp.sum(out * cot) / shape.tokens

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if impl != "reference":
        return step

    def reference(p, x):
        with jax.default_matmul_precision("float32"):
            return step(p, x)

    return reference


def _grad_err(grads, ref) -> float:
    """The worst normwise relative error over the gradients, `||g - r||_2 / ||r||_2` per leaf."""
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        g = np.asarray(g, np.float64)
        r = np.asarray(r, np.float64)
        worst = max(worst, float(np.linalg.norm(g - r) / max(float(np.linalg.norm(r)), 1e-30)))
    return worst


def _perturbed(tree: Any, key: jax.Array) -> Any:
    """Every leaf times `1 + e`, `e` drawn per element uniformly from +-2^-8 (bf16's unit
    roundoff)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = [
        leaf * (1 + BF16_UNIT_ROUNDOFF * jax.random.uniform(k, leaf.shape, minval=-1, maxval=1))
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_row(
    shape, impl, storage, *, steps, warmup, interpret, chunk, ref_grads, rounding_err
) -> dict:
    row: dict[str, Any] = dict(
        kind=shape.kind,
        tokens=shape.tokens,
        n=shape.n,
        d=shape.d,
        hidden=shape.hidden,
        impl=impl,
        config=impl[len("kernel[") : -1] if impl.startswith("kernel[") else None,
        storage=storage,
        platform=jax.default_backend(),
        interpreted=interpret and impl.startswith("kernel["),
        ms=None,
        status="ok",
    )
    params = _params(shape)
    if storage == "bf16":
        params = {k: v.astype(jnp.bfloat16) for k, v in params.items()}
    x = jax.random.normal(jax.random.key(1), (shape.tokens, shape.d))
    try:
        step = _step(shape, impl, storage, interpret=interpret, chunk=chunk)
        compiled = step.lower(params, x).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            row["temp_mib"] = mem.temp_size_in_bytes / 2**20
            row["peak_mib"] = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            ) / 2**20
        _, grads = compiled(params, x)
        row["grad_err"] = err = _grad_err(grads, ref_grads)
        row["grad_tol"] = tol = GRAD_TOL_FACTOR * rounding_err
        if not err <= tol:
            row["status"] = (
                f"WRONG: gradients off by {err:.3g} (> {tol:.3g}, {GRAD_TOL_FACTOR:g} x the "
                f"bf16 rounding error {rounding_err:.3g}); not timed"
            )
            return row
        for _ in range(warmup):
            jax.block_until_ready(compiled(params, x))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, x))
            times.append(time.perf_counter() - t0)
        row["ms"] = 1e3 * statistics.median(times)
        tflops = shape.model_flops() / (row["ms"] * 1e-3) / 1e12
        row["model_tflops"] = tflops
        row["pct_of_989"] = 100.0 * tflops / PEAK_TFLOPS
        device = jax.devices()[0]
        if device.platform == "gpu":
            stats = device.memory_stats() or {}
            row["device_high_water_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    except Exception as e:  # noqa: BLE001 - every failure is a row, the run goes on.
        if _is_oom(e):
            row["status"] = "OOM: ran out of device memory"
        else:
            row["status"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def _markdown(table: dict) -> str:
    head = table["header"]
    lines = [f"# {head['title']}", "", head["note"], ""]
    cols = [
        "kind",
        "tokens",
        "n",
        "storage",
        "impl",
        "status",
        "ms",
        "model_tflops",
        "pct_of_989",
        "temp_mib",
        "peak_mib",
        "grad_err",
        "grad_tol",
        "vs_xla",
        "vs_xla_remat",
    ]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in table["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict]) -> None:
    """Each timed row's time over XLA's and XLA + checkpoint's at the same case."""
    for r in rows:
        for base in ("xla", "xla_remat"):
            match = [
                b
                for b in rows
                if b["impl"] == base
                and b.get("ms")
                and r.get("ms")
                and (b["kind"], b["tokens"], b["n"], b["storage"])
                == (r["kind"], r["tokens"], r["n"], r["storage"])
            ]
            r[f"vs_{base}"] = r["ms"] / match[0]["ms"] if match else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU: kernels in the Mosaic GPU interpreter, tiny shapes (no timings)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--budget-s", type=float, default=330.0, help="stop adding cases after this many seconds"
    )
    ap.add_argument("--out", default=None, help="output stem (default results/ffn_device[_dry])")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated implementations to run (e.g. 'xla,kernel[pipelined]')",
    )
    ap.add_argument("--kinds", default="ffn,gated_ffn", help="comma-separated: ffn, gated_ffn")
    ap.add_argument(
        "--storages",
        default="f32->bf16,bf16",
        help="comma-separated weight storage: f32->bf16 (cast in the step), bf16",
    )
    args = ap.parse_args(argv)
    if args.steps < 10 and not args.dry_run:
        ap.error("--steps must be >= 10 for a device run")
    dry = args.dry_run
    if dry:
        jax.config.update("jax_platforms", "cpu")
    cases = DRY_CASES if dry else DEVICE_CASES
    # d = 128: two K steps, so the configs keep a WGMMA in flight (one step keeps none).
    d, hidden, chunk = (128, 128, 128) if dry else (1024, 4096, 1024)
    steps, warmup = (1, 0) if dry else (args.steps, 2)
    kinds = args.kinds.split(",")
    cases = [c for c in cases if c[0] in kinds]
    impls = ["xla", "xla_remat", "xla_chunked"] + [f"kernel[{name}]" for name in CONFIGS]
    stem = (
        pathlib.Path(args.out)
        if args.out
        else RESULTS / ("ffn_device_dry" if dry else "ffn_device")
    )
    device = jax.devices()[0]
    table: dict[str, Any] = {
        "header": {
            "title": (
                "CPU DRY RUN of benchmarks/ffn_device.py (correctness only: NOT performance "
                "numbers)"
                if dry
                else f"benchmarks/ffn_device.py on {device.device_kind}"
            ),
            "note": (
                f"jax {jax.__version__}, {device.device_kind}, d={d}, H={hidden}, bf16 FFN, "
                f"{steps} timed step(s) after {warmup} warm-up. "
                + (
                    "Kernels ran in the Mosaic GPU interpreter on CPU: the ms, TFLOP/s and memory "
                    "columns describe the interpreter and CPU XLA, not a GPU; only `status`, "
                    "`grad_err` and `grad_tol` carry information."
                    if dry
                    else "ms = median step; model TFLOP/s counts 3 x forward matmul FLOPs."
                )
                + f" grad_err: worst normwise relative gradient error against the float32 "
                f"reference; grad_tol = {GRAD_TOL_FACTOR:g} x that error of the reference run on "
                "inputs perturbed by bf16's unit roundoff (2^-8)."
            ),
            "configs": {k: dataclasses.asdict(v) for k, v in CONFIGS.items()},
        },
        "rows": [],
    }
    start = time.perf_counter()

    def spent() -> bool:
        return time.perf_counter() - start > args.budget_s

    def emit(row: dict) -> None:
        table["rows"].append(row)
        print(json.dumps(row), flush=True)
        _ratios(table["rows"])
        stem.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
        stem.with_suffix(".md").write_text(_markdown(table))

    for kind, tokens, n in cases:
        shape = Shape(kind, tokens, n, d, hidden)
        case_impls = impls + (["tokamax"] if kind == "gated_ffn" else [])
        if args.only:
            case_impls = [i for i in case_impls if i in args.only.split(",")]
        for storage in args.storages.split(","):
            case = dict(kind=kind, tokens=tokens, n=n, storage=storage)
            if spent():
                emit(dict(case, impl="*", status="skipped: time budget spent"))
                continue
            ref = _step(shape, "reference", storage, interpret=dry, chunk=chunk)
            # float32 parameters whatever the storage (the reference casts to float32 anyway), so
            # its gradients are float32 too and one compiled reference serves the perturbed run.
            ref_params = jax.tree.map(lambda v: v.astype(jnp.float32), _params(shape))
            if storage == "bf16":
                ref_params = jax.tree.map(
                    lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), ref_params
                )
            x = jax.random.normal(jax.random.key(1), (tokens, d))
            try:
                _, ref_grads = ref(ref_params, x)
                _, perturbed_grads = ref(*_perturbed((ref_params, x), jax.random.key(2)))
            except Exception as e:  # noqa: BLE001 - a row saying so, the run goes on.
                status = "OOM" if _is_oom(e) else f"ERROR: {type(e).__name__}"
                emit(dict(case, impl="reference", status=f"{status}: case skipped"))
                continue
            rounding_err = _grad_err(perturbed_grads, ref_grads)
            for i, impl in enumerate(case_impls):
                if spent():
                    for rest in case_impls[i:]:
                        emit(dict(case, impl=rest, status="skipped: time budget spent"))
                    break
                if impl == "tokamax" and _tokamax_glu() is None:
                    emit(dict(case, impl=impl, status="skipped: tokamax not importable"))
                    continue
                emit(
                    run_row(
                        shape,
                        impl,
                        storage,
                        steps=steps,
                        warmup=warmup,
                        interpret=dry,
                        chunk=chunk,
                        ref_grads=ref_grads,
                        rounding_err=rounding_err,
                    )
                )
    print(f"wrote {stem}.json and {stem}.md in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

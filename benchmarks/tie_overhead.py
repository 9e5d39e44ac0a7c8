"""Does `tie` cost anything under `jit`? A 12-block Universal Transformer with one shared FFN.

Compares, in one run and on the same weights:

- `tied`: the model written with an MLP per block, tied by `TieSpec(ffn="blocks[*].mlp")`;
- `hand`: the hand-written alternative, blocks without MLPs and the one MLP passed at call time;
- `untied`: an MLP per block, nothing shared.

Checks that `tied` and `hand` agree (loss and the MLP's gradient) before timing, then prints
HLO parameter counts of the compiled loss+grad step and its runtime, as ratios to `hand`.

Then the per-call (dispatch) cost, on a model small enough that the call is all overhead: the
same model at `--dispatch-blocks` (32) blocks of width 8, called through `eqx.filter_jit` as
users call it, packed (`tied`) against untied, with the leaves each passes. Writes JSON next to
this file under `results/`.

    python benchmarks/tie_overhead.py [--blocks 12] [--width 128] [--repeats 30]
"""

import argparse
import json
import pathlib
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import tietransform as tt


class Attention(eqx.Module):
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, width: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k1)
        self.out = eqx.nn.Linear(width, width, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (seq, width)
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        weights = jax.nn.softmax(q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])), axis=-1)
        return jax.vmap(self.out)(weights @ v)


class Block(eqx.Module):
    attn: Attention
    mlp: eqx.nn.MLP | None

    def __call__(self, x: jax.Array, mlp: eqx.nn.MLP | None = None) -> jax.Array:
        x = x + self.attn(x)
        return x + jax.vmap(mlp if mlp is not None else self.mlp)(x)


class UniversalTransformer(eqx.Module):
    blocks: list[Block]

    def __call__(self, x: jax.Array, mlp: eqx.nn.MLP | None = None) -> jax.Array:
        for block in self.blocks:
            x = block(x, mlp)
        return x


def build(blocks: int, width: int, key: jax.Array) -> UniversalTransformer:
    keys = jax.random.split(key, 2 * blocks)
    return UniversalTransformer(
        [
            Block(
                Attention(width, key=keys[2 * i]),
                eqx.nn.MLP(width, width, 4 * width, 1, key=keys[2 * i + 1]),
            )
            for i in range(blocks)
        ]
    )


def loss(model: UniversalTransformer, x: jax.Array, mlp: eqx.nn.MLP | None = None) -> jax.Array:
    return jnp.mean(jax.vmap(lambda s: model(s, mlp))(x) ** 2)


def compiled_step(fn, *args):
    """The jitted value-and-grad step, compiled, with its argument arrays."""
    arrays, static = eqx.partition(args, eqx.is_array)

    def step(arrays):
        return jax.value_and_grad(lambda a: fn(*eqx.combine(a, static)))(arrays)

    compiled = jax.jit(step).lower(arrays).compile()
    return compiled, arrays


def hlo_parameters(compiled) -> int:
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    return sum(" parameter(" in line for line in entry.splitlines())


def dispatch_times(blocks: int, calls: int) -> dict[str, dict[str, float]]:
    """Median seconds per jitted call (all dispatch: width 8), packed against untied."""
    model = build(blocks, 8, jax.random.key(2))
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    packed = tt.pack(model, spec)
    x = jnp.ones((1, 2, 8))
    calls_of = {
        "tied": (eqx.filter_jit(tt.tie(loss, spec)), packed),
        "untied": (eqx.filter_jit(loss), model),
    }
    np.testing.assert_allclose(
        calls_of["tied"][0](packed, x), loss(tt.unpack(packed, spec), x), rtol=1e-5
    )
    times: dict[str, list[float]] = {name: [] for name in calls_of}
    for fn, params in calls_of.values():
        jax.block_until_ready(fn(params, x))
    for _ in range(calls):
        for name, (fn, params) in calls_of.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "leaves": len(jax.tree.leaves(params)),
            "array_leaves": len(jax.tree.leaves(eqx.filter(params, eqx.is_array))),
            "call_seconds_median": statistics.median(times[name]),
        }
        for name, (_, params) in calls_of.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dispatch-blocks", type=int, default=32)
    parser.add_argument("--dispatch-calls", type=int, default=300)
    args = parser.parse_args()

    model = build(args.blocks, args.width, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.width))
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    packed = tt.pack(model, spec)
    shared_mlp = packed.blocks[0].mlp
    no_mlps = eqx.tree_at(lambda m: [b.mlp for b in m.blocks], model, replace_fn=lambda _: None)

    variants = {
        "hand": compiled_step(loss, no_mlps, x, shared_mlp),
        "tied": compiled_step(tt.tie(loss, spec), packed, x),
        "untied": compiled_step(loss, model, x),
    }

    # Correctness first: the tied program is the hand-written one.
    (hand_value, hand_grads), (tied_value, tied_grads) = (
        variants[name][0](variants[name][1]) for name in ("hand", "tied")
    )
    np.testing.assert_allclose(tied_value, hand_value, rtol=1e-6)
    hand_mlp_grad = hand_grads[2].layers[0].weight
    tied_mlp_grad = tied_grads[0].blocks[0].mlp.layers[0].weight
    np.testing.assert_allclose(tied_mlp_grad, hand_mlp_grad, rtol=1e-5, atol=1e-7)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (compiled, arrays) in variants.items():  # warm up
        jax.block_until_ready(compiled(arrays))
    for _ in range(args.repeats):  # interleave variants so drift hits all of them alike
        for name, (compiled, arrays) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(arrays))
            times[name].append(time.perf_counter() - start)

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, f32")
    print(
        f"model: {args.blocks} blocks, width {args.width}, hidden {4 * args.width}, "
        f"batch {args.batch}x{args.seq}"
    )
    results = {
        "device": str(device.device_kind),
        "jax": jax.__version__,
        "args": vars(args),
        "variants": {},
    }
    base = statistics.median(times["hand"])
    print(f"{'variant':8} {'HLO params':>10} {'step ms':>9} {'vs hand':>8}")
    for name, (compiled, _) in variants.items():
        median = statistics.median(times[name])
        params = hlo_parameters(compiled)
        results["variants"][name] = {
            "hlo_parameters": params,
            "step_seconds_median": median,
            "ratio_to_hand": median / base,
        }
        print(f"{name:8} {params:>10} {1e3 * median:>9.2f} {median / base:>8.3f}")
    dispatch = dispatch_times(args.dispatch_blocks, args.dispatch_calls)
    results["dispatch"] = dispatch
    print(f"dispatch, {args.dispatch_blocks} blocks of width 8, through eqx.filter_jit:")
    print(f"{'variant':8} {'leaves':>7} {'arrays':>7} {'call ms':>8} {'vs untied':>9}")
    untied = dispatch["untied"]["call_seconds_median"]
    for name, row in dispatch.items():
        seconds = row["call_seconds_median"]
        print(
            f"{name:8} {row['leaves']:>7} {row['array_leaves']:>7} {1e3 * seconds:>8.3f} "
            f"{seconds / untied:>9.3f}"
        )
    out = pathlib.Path(__file__).parent / "results" / "tie_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

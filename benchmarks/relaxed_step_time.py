"""Does a relaxed tie cost anything under `jit`? Training step time against a hand-written LoRA.

The model is a stack of `L` pre-norm transformer layers (RMS norm, causal multi-head attention,
GELU FFN), written untied with stacked weights (every leaf has a leading axis `L`) and run with
`lax.scan` over the layers. Compared, in one run, on the same weights and the same batch:

- `relaxed`: the untied model tied by
  `tt.share_layers("layers", "cycle", layers=L, blocks=k, stacked=True, relax=tt.relaxed(r))`:
  every layer reads its block's matrices plus its own rank-`r` delta, `x @ W + (x @ B_l) @ A_l`;
  biases and norm scales tied strictly (`others="shared"`);
- `hand`: the same math written by hand: the `k` blocks' weights and every layer's factors
  `B_l`, `A_l` as explicit arrays, `lax.scan` over `(block index, B_l, A_l)`, each matmul
  written `x @ W + (x @ B_l) @ A_l`;
- `strict`: the same sharing without relaxation (`k` blocks, no factors), and `untied`: the
  model as written, for reference.

Each variant's training step is `eqx.filter_value_and_grad` of the loss and an `optax.adam`
update, under `eqx.filter_jit`. Before timing, `relaxed` and `hand` are checked to compute the
same loss and the same gradients (the hand-written gradients mapped onto the packed leaves:
`W` rows, factor rows). Then the steps run interleaved (in a shuffled order each round), and the
median step time of each is reported, as a ratio to `hand` for the relaxed variants (the
target: at most 1.05), with in brackets the median of the per-round ratios (each round's two
steps ran under the same load: the robust figure on a shared machine). Writes
`results/relaxed_step_time.{json,md}`.

    python benchmarks/relaxed_step_time.py [--d 256] [--hidden 1024] [--layers 8]
        [--batch 8] [--seq 256] [--blocks 1,2] [--ranks 8,32] [--rounds 30]
        [--hlo-dir DIR]

`--hlo-dir` also writes each variant's optimised HLO (`jit(step).lower(...).compile()`), to
compare what XLA runs for `relaxed` and `hand`.
"""

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

import tietransform as tt
from tietransform.testing import tolerance


MATRICES = ("qkv", "out", "w1", "w2")


class Layers(eqx.Module):
    """The weights of `L` layers, stacked: every leaf has a leading axis `L` (or `k` blocks)."""

    attn_norm: Float[Array, "L d"]
    qkv: Float[Array, "L d 3d"]
    out: Float[Array, "L d d"]
    ffn_norm: Float[Array, "L d"]
    w1: Float[Array, "L d hidden"]
    b1: Float[Array, "L hidden"]
    w2: Float[Array, "L hidden d"]
    b2: Float[Array, "L d"]


class Model(eqx.Module):
    layers: Layers
    heads: int = eqx.field(static=True)


class HandLoRA(eqx.Module):
    """Shared weights and per-layer LoRA factors, written out: `shared` holds the `k` blocks,
    `lora_b[name]` is `(L, m, r)` and `lora_a[name]` `(L, r, n)`; layer `l` reads block
    `rows[l]`."""

    shared: Layers
    lora_b: dict[str, Array]
    lora_a: dict[str, Array]
    rows: tuple[int, ...] = eqx.field(static=True)
    heads: int = eqx.field(static=True)


def build(key: jax.Array, layers: int, d: int, hidden: int, heads: int) -> Model:
    keys = jax.random.split(key, 8)

    def normal(k, shape, scale):
        return scale * jax.random.normal(k, (layers, *shape))

    return Model(
        Layers(
            attn_norm=1 + normal(keys[0], (d,), 0.1),
            qkv=normal(keys[1], (d, 3 * d), d**-0.5),
            out=normal(keys[2], (d, d), d**-0.5),
            ffn_norm=1 + normal(keys[3], (d,), 0.1),
            w1=normal(keys[4], (d, hidden), d**-0.5),
            b1=normal(keys[5], (hidden,), 0.1),
            w2=normal(keys[6], (hidden, d), hidden**-0.5),
            b2=normal(keys[7], (d,), 0.1),
        ),
        heads,
    )


def rms_norm(x: Array, scale: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def layer(h: Array, p: Layers, heads: int, matmul: Callable[[Array, str], Array]) -> Array:
    """One pre-norm layer on `h` `(batch, seq, d)`; `matmul(x, name)` is `x @ p.<name>` (or its
    relaxed form): the one place the two ways of writing the model differ."""
    batch, seq, d = h.shape
    x = rms_norm(h, p.attn_norm)
    q, k, v = (
        a.reshape(batch, seq, heads, d // heads) for a in jnp.split(matmul(x, "qkv"), 3, axis=-1)
    )
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads).astype(np.float32)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    h = h + matmul(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, d), "out")
    x = rms_norm(h, p.ffn_norm)
    return h + matmul(jax.nn.gelu(matmul(x, "w1") + p.b1), "w2") + p.b2


def loss(model: Model, x: Array, y: Array) -> Array:
    """The untied model, written as if nothing were tied: `lax.scan` over the stacked layers."""

    def step(h, p):
        return layer(h, p, model.heads, lambda a, name: a @ getattr(p, name)), None

    h, _ = jax.lax.scan(step, x, model.layers)
    return jnp.mean((h - y) ** 2)


def hand_loss(model: HandLoRA, x: Array, y: Array) -> Array:
    """Shared blocks plus per-layer LoRA, by hand: `x @ W + (x @ B_l) @ A_l` in each layer."""
    single = len(set(model.rows)) == 1

    def step(h, xs):
        row, b, a = xs
        if single:  # one block: a loop constant
            p = jax.tree.map(lambda w: w[0], model.shared)
        else:
            p = jax.tree.map(lambda w: w[row], model.shared)

        def matmul(v, name):
            return v @ getattr(p, name) + (v @ b[name]) @ a[name]

        return layer(h, p, model.heads, matmul), None

    rows = jnp.asarray(model.rows, jnp.int32)
    h, _ = jax.lax.scan(step, x, (rows, model.lora_b, model.lora_a))
    return jnp.mean((h - y) ** 2)


def hand_from_packed(packed: Model) -> HandLoRA:
    """The hand-written model holding the packed model's very arrays."""
    leaves = packed.layers
    rows = {getattr(leaves, f).rows for f in Layers.__dataclass_fields__}
    (rows,) = rows
    order = {name: np.asarray(getattr(leaves, name).factor_rows) for name in MATRICES}
    return HandLoRA(
        shared=jax.tree.map(
            lambda leaf: leaf.data, leaves, is_leaf=lambda x: isinstance(x, tt.StackedLeaf)
        ),
        lora_b={name: getattr(leaves, name).lora_b[order[name]] for name in MATRICES},
        lora_a={name: getattr(leaves, name).lora_a[order[name]] for name in MATRICES},
        rows=rows,
        heads=packed.heads,
    )


def check_same_math(packed: Model, spec: tt.TieSpec, hand: HandLoRA, x, y, tokens: int) -> float:
    """Asserts that the relaxed and hand-written models give the same loss and gradients (the
    hand-written ones mapped onto the packed leaves); returns the largest normwise error.

    Both compute the same products and sums, XLA may fuse and order them differently: the
    tolerance is float32's for a sum of `tokens * L` terms (a shared weight's gradient sums over
    every token of every layer reading it)."""
    tied = eqx.filter_jit(eqx.filter_value_and_grad(tt.tie(loss, spec)))
    manual = eqx.filter_jit(eqx.filter_value_and_grad(hand_loss))
    (value, grads), (hand_value, hand_grads) = tied(packed, x, y), manual(hand, x, y)
    layers = len(hand.rows)
    bound = tolerance(jnp.float32, tokens * layers)
    pairs = [("loss", value, hand_value)]
    for name in Layers.__dataclass_fields__:
        leaf = getattr(grads.layers, name)
        pairs.append((f"{name} W", leaf.data, getattr(hand_grads.shared, name)))
        if name in MATRICES:
            order = np.asarray(leaf.factor_rows)
            pairs.append((f"{name} B", leaf.lora_b[order], hand_grads.lora_b[name]))
            pairs.append((f"{name} A", leaf.lora_a[order], hand_grads.lora_a[name]))
    worst = 0.0
    for what, got, expected in pairs:
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
        assert error <= bound, f"relaxed and hand-written {what} differ: {error:.2e} > {bound:.2e}"
        worst = max(worst, error)
    return worst


def make_step(objective: Callable, params, lr: float):
    """The jitted training step `(params, state, x, y) -> (params, state, loss)`, and a state."""
    optimizer = optax.adam(lr)

    @eqx.filter_jit
    def step(params, state, x, y):
        value, grads = eqx.filter_value_and_grad(objective)(params, x, y)
        updates, state = optimizer.update(grads, state, eqx.filter(params, eqx.is_array))
        return eqx.apply_updates(params, updates), state, value

    return step, optimizer.init(eqx.filter(params, eqx.is_array))


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(params, eqx.is_array)))


def write_hlo(directory: pathlib.Path, name: str, step, params, state, x, y) -> None:
    """The step's HLO as lowered and as XLA optimised it (`jax.jit(...).lower(...)`)."""
    arrays, static = eqx.partition((params, state), eqx.is_array)
    fn = jax.jit(lambda arrays, x, y: step.__wrapped__(*eqx.combine(arrays, static), x, y))
    lowered = fn.lower(arrays, x, y)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.lowered.txt").write_text(lowered.as_text())
    (directory / f"{name}.compiled.txt").write_text(lowered.compile().as_text())


def table_row(r: dict) -> str:
    low, high = (f"{1e3 * t:.1f}" for t in r["step_seconds_quartiles"])
    vs_hand = (
        f"{r['ratio_to_hand']:.3f} ({r['paired_ratio_to_hand']:.3f})"
        if "ratio_to_hand" in r
        else ""
    )
    return (
        f"| {r['variant']} | {r['parameters']:,} | {1e3 * r['step_seconds_median']:.1f} | "
        f"{low}-{high} | {vs_hand} | {r['ratio_to_untied']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--blocks", default="1,2")
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hlo-dir", default=None)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    tokens = args.batch * args.seq

    model = build(jax.random.key(0), args.layers, args.d, args.hidden, args.heads)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (args.batch, args.seq, args.d))
    y = jax.random.normal(ky, (args.batch, args.seq, args.d))

    def spec_for(k: int, rank: int | None) -> tt.TieSpec:
        relax = None if rank is None else tt.relaxed(rank)
        shared = tt.share_layers(
            "layers", "cycle", layers=args.layers, blocks=k, stacked=True, relax=relax
        )
        return tt.TieSpec(shared)

    variants: dict[str, tuple[Callable, object]] = {"untied": (loss, model)}
    checks = {}
    for k in blocks:
        spec = spec_for(k, None)
        variants[f"strict k={k}"] = (tt.tie(loss, spec), tt.pack(model, spec))
        for rank in ranks:
            spec = spec_for(k, rank)
            packed = tt.pack(model, spec)
            hand = hand_from_packed(packed)
            checks[f"k={k} r={rank}"] = check_same_math(packed, spec, hand, x, y, tokens)
            print(f"k={k} r={rank}: relaxed == hand (worst normwise error "
                  f"{checks[f'k={k} r={rank}']:.1e})", flush=True)  # fmt: skip
            variants[f"relaxed k={k} r={rank}"] = (tt.tie(loss, spec), packed)
            variants[f"hand k={k} r={rank}"] = (hand_loss, hand)

    steps = {}
    for name, (objective, params) in variants.items():
        step, state = make_step(objective, params, args.lr)
        start = time.perf_counter()
        params, state, _ = jax.block_until_ready(step(params, state, x, y))
        compile_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            params, state, _ = jax.block_until_ready(step(params, state, x, y))
        steps[name] = [step, params, state, compile_s]
        if args.hlo_dir:
            write_hlo(pathlib.Path(args.hlo_dir), name.replace(" ", "_"), step, params, state, x, y)
        print(f"{name}: compiled and warmed up ({compile_s:.1f} s)", flush=True)

    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            step, params, state, _ = steps[name]
            start = time.perf_counter()
            params, state, _ = jax.block_until_ready(step(params, state, x, y))
            times[name].append(time.perf_counter() - start)
            steps[name][1:3] = params, state

    def quartiles(name):
        q = statistics.quantiles(times[name], n=4)
        return q[0], statistics.median(times[name]), q[2]

    device = jax.devices()[0]
    header = (
        f"Training step (value_and_grad + optax.adam, eqx.filter_jit), float32: {args.layers} "
        f"pre-norm layers (d = {args.d}, hidden {args.hidden}, {args.heads} heads) scanned over "
        f"stacked weights, batch {args.batch} x {args.seq} = {tokens} tokens; layers cycle over "
        f"k blocks. Median of {args.rounds} interleaved steps after {args.warmup} warm-up steps; "
        f"jax {jax.__version__}, {device.device_kind} ({platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores)."
    )
    rows = []
    for name in steps:
        low, median, high = quartiles(name)
        row = {
            "variant": name,
            "parameters": count(variants[name][1]),
            "compile_seconds": steps[name][3],
            "step_seconds_median": median,
            "step_seconds_quartiles": [low, high],
        }
        if name.startswith("relaxed"):
            hand_times = times["hand" + name[len("relaxed") :]]
            row["ratio_to_hand"] = median / statistics.median(hand_times)
            row["paired_ratio_to_hand"] = statistics.median(
                t / h for t, h in zip(times[name], hand_times, strict=True)
            )  # the two steps of one round ran under the same load
            row["check_error"] = checks[name[len("relaxed ") :]]
        row["ratio_to_untied"] = median / statistics.median(times["untied"])
        rows.append(row)
    lines = [
        header,
        "",
        "| variant | parameters | step ms (median) | quartiles ms | vs hand LoRA (paired) "
        "| vs untied |",
        "|---|---|---|---|---|---|",
        *(table_row(r) for r in rows),
    ]
    text = "\n".join(lines)
    print(text)
    out = pathlib.Path(__file__).parent / "results"
    (out / "relaxed_step_time.md").write_text(text + "\n")
    (out / "relaxed_step_time.json").write_text(
        json.dumps(
            {
                "jax": jax.__version__,
                "device": device.device_kind,
                "cpu_count": os.cpu_count(),
                "args": vars(args),
                "rows": rows,
                "times": times,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

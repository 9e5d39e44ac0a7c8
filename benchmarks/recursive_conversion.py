"""Converting a trained untied model into a recursive one: sharing strategies and initialisations.

The model is the Universal Transformer example's (`examples/universal_transformer.py`): `n`
layers of (attention, FFN) scanned over stacked weights, trained untied on multi-digit
addition. Each case then shares whole layers (attention and FFN) among `k` blocks with
`tt.share_layers("blocks", strategy, layers=n, blocks=k, stacked=True, init=...)`, packs the
trained model (the conversion), and uptrains it. For each case, in one run:

- the parameter count of the packed model;
- the held-out loss right after the conversion, and after `--uptrain` steps;
- the untied model trained for the same extra steps, as the reference row.

Relaxed rows (`relax=tt.relaxed(r)`, Relaxed Recursive Transformers: each layer reads its
block's `W` plus its own rank-`r` delta `B_l @ A_l`, initialised by truncated SVD of `W_l - W`)
convert `cycle` and `sequence` with `k = 2` and average init at ranks 1, 4 and 16, and at full
rank (`min(m, n)` of the block's matrices, the width). Biases and norm scales are tied strictly
(`others="shared"`, the default) except in the last row of each strategy, `others="own"`, which
keeps them per layer: at full rank that conversion loses nothing, and the script asserts that
its loss right after conversion is the untied model's (to float32 rounding). The parameter
counts include the factors.

Then the compile time of one tied training step for a cycled model at growing depth (flat in
`L` under `lax.scan`: the body is traced once). Writes
`results/recursive_conversion.{json,md,png}` (the plot needs matplotlib, the `benchmarks`
extra).

    python benchmarks/recursive_conversion.py [--n 6] [--steps 800] [--uptrain 60]
"""

import argparse
import json
import os
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import universal_transformer as ut  # noqa: E402

import tietransform as tt  # noqa: E402
from tietransform.testing import tolerance  # noqa: E402


CASES = [
    ("cycle", 2, "average"),
    ("cycle", 2, "lower"),
    ("cycle", 3, "average"),
    ("cycle", 3, "lower"),
    ("sequence", 2, "average"),
    ("sequence", 2, "lower"),
    ("sequence", 3, "average"),
    ("middle_cycle", 2, "average"),
    ("middle_cycle", 2, "lower"),
]
RELAXED_STRATEGIES = ("cycle", "sequence")
RELAXED_RANKS = (1, 4, 16)  # then full rank, with others="shared" and with others="own"


def heldout_loss(objective, model, key, batch: int, digits: int) -> float:
    tokens, targets = ut.addition_batch(key, batch, digits)
    return float(objective(model, tokens, targets)[0])


def count_parameters(model) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def full_rank(model) -> int:
    """`min(m, n)` over the layers' matrices: the rank at which a relaxed tie is exact."""
    leaves = jax.tree.leaves(eqx.filter(model.blocks, eqx.is_inexact_array))
    return min(min(x.shape[-2:]) for x in leaves if x.ndim == 3)


def recovery_tolerance(packed) -> float:
    """Relative float32 tolerance on the loss of a full-rank conversion against the untied loss.

    The converted model computes each relaxed matmul as `x @ W + (x @ B) @ A` where the untied
    one computes `x @ W_l`: `tietransform.testing.check_tied` counts `m + n + r` extra summands
    per relaxed read (the reassociated sums, their errors adding to first order through the
    network). The reference here is the untied model itself, not `unpack(pack(untied))`, so
    `W + B @ A` rounds once more against `W_l` (the SVD's `r` rank-one terms): twice that count.
    """
    extra = sum(
        leaf.lora_b.shape[0] * (leaf.lora_b.shape[1] + leaf.lora_b.shape[2] + leaf.lora_a.shape[2])
        for leaf in jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, tt.StackedLeaf))
        if isinstance(leaf, tt.StackedLeaf) and leaf.lora_b is not None
    )  # T relaxed slices of (m, n) matrices at rank r: T (m + r + n)
    return tolerance(jnp.float32, 1 + 2 * extra)


def train(objective, model, steps: int, args, seed: int):
    optimizer = optax.adam(args.lr)
    step = ut.make_step(optimizer, args.batch, args.digits, objective=objective)
    state = optimizer.init(eqx.filter(model, eqx.is_array))
    for key in jax.random.split(jax.random.key(seed), steps):
        model, state, _, _ = step(model, state, key)
    return model


def compile_seconds(layers: int, args) -> float:
    """Seconds to trace and compile one tied training step of a model cycled onto 2 blocks."""
    spec = tt.TieSpec(tt.share_layers("blocks", "cycle", layers=layers, blocks=2, stacked=True))
    packed = tt.pack(ut.build(layers, args.width, args.digits, jax.random.key(0)), spec)
    optimizer = optax.adam(args.lr)
    step = ut.make_step(optimizer, args.batch, args.digits, objective=tt.tie(ut.loss_fn, spec))
    state = optimizer.init(eqx.filter(packed, eqx.is_array))
    start = time.perf_counter()
    jax.block_until_ready(step(packed, state, jax.random.key(1)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--digits", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--uptrain", type=int, default=60)
    parser.add_argument("--eval-batch", type=int, default=2048)
    parser.add_argument("--depths", default="4,8,16,32")
    args = parser.parse_args()
    eval_key = jax.random.key(12345)
    started = time.perf_counter()

    untied = train(ut.loss_fn, ut.build(args.n, args.width, args.digits, jax.random.key(0)),
                   args.steps, args, seed=1)  # fmt: skip

    def row(case, objective, converted):
        uptrained = train(objective, converted, args.uptrain, args, seed=2)
        losses = [
            heldout_loss(objective, m, eval_key, args.eval_batch, args.digits)
            for m in (converted, uptrained)
        ]
        print(case, losses, flush=True)
        return {
            "case": case,
            "parameters": count_parameters(converted),
            "loss_converted": losses[0],
            "loss_uptrained": losses[1],
        }

    rows = [row(f"untied (k = n = {args.n})", ut.loss_fn, untied)]
    for strategy, blocks, init in CASES:
        shared = tt.share_layers(
            "blocks", strategy, layers=args.n, blocks=blocks, stacked=True, init=init
        )
        spec = tt.TieSpec(shared)
        case = f"{strategy}, k = {blocks}, {init}"
        rows.append(row(case, tt.tie(ut.loss_fn, spec), tt.pack(untied, spec)))
    full = full_rank(untied)
    relaxations = [(r, "shared") for r in (*RELAXED_RANKS, full)] + [(full, "own")]
    for strategy in RELAXED_STRATEGIES:
        for rank, others in relaxations:
            relax = tt.relaxed(rank, others=others)
            spec = tt.TieSpec(
                tt.share_layers(
                    "blocks", strategy, layers=args.n, blocks=2, stacked=True, init="average",
                    relax=relax,
                )
            )  # fmt: skip
            packed = tt.pack(untied, spec)
            case = f"{strategy}, k = 2, average, relaxed r = {rank}" + (
                f" (full), others {others}" if rank == full else ""
            )
            rows.append(row(case, tt.tie(ut.loss_fn, spec), packed) | {"relaxed": True})
            if rank == full and others == "own":  # nothing tied strictly: the untied model
                error = abs(rows[-1]["loss_converted"] / rows[0]["loss_converted"] - 1)
                bound = recovery_tolerance(packed)
                rows[-1] |= {"recovery_error": error, "recovery_tolerance": bound}
                print(f"full-rank recovery: relative error {error:.2e} (tolerance {bound:.2e})")
                assert error <= bound, (case, error, bound)
    depths = [int(d) for d in args.depths.split(",")]
    compiles = {d: compile_seconds(d, args) for d in depths}

    lines = [
        f"Untied model: n = {args.n} layers, width {args.width}, {args.digits}-digit addition, "
        f"trained {args.steps} steps; each case converted, then uptrained {args.uptrain} steps "
        f"(held-out cross-entropy on {args.eval_batch} additions; jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}).",
        "",
        "| case | parameters | loss after conversion | loss after uptraining |",
        "|---|---|---|---|",
        *(
            f"| {r['case']} | {r['parameters']:,} | {r['loss_converted']:.3f} | "
            f"{r['loss_uptrained']:.3f} |"
            for r in rows
        ),
        "",
        "Compile time of one tied training step, cycled onto 2 blocks:",
        "",
        "| layers | compile s |",
        "|---|---|",
        *(f"| {d} | {s:.2f} |" for d, s in compiles.items()),
    ]
    recovered = [r for r in rows if "recovery_error" in r]
    lines[len(rows) + 4 : len(rows) + 4] = [
        "",
        "Relaxed rows: `tt.relaxed(r)` on the shared layers (factors from the truncated SVD of "
        "each layer's residual to its block's mean); biases and norm scales tied strictly unless "
        "`others own`; parameter counts include the factors. At full rank with `others own` the "
        "conversion is exact: relative difference to the untied loss "
        + ", ".join(f"{r['recovery_error']:.1e}" for r in recovered)
        + f" (asserted below the float32 bound {recovered[0]['recovery_tolerance']:.1e}).",
    ]
    seconds = time.perf_counter() - started
    lines.append("")
    lines.append(f"Whole run: {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.")
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results"
    (out / "recursive_conversion.md").write_text(text + "\n")
    (out / "recursive_conversion.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "jax": jax.__version__,
                "rows": rows,
                "compile_seconds": compiles,
                "run_seconds": seconds,
            },
            indent=2,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[benchmarks]')")
        return

    def draw(ax, r, **style):
        ax.plot([0, args.uptrain], [r["loss_converted"], r["loss_uptrained"]], marker="o",
                label=f"{r['case']} ({r['parameters'] / 1e3:.0f}k params)", **style)  # fmt: skip

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for r in rows:
        if not r.get("relaxed"):
            draw(axes[0], r)
    draw(axes[1], rows[0], color="black")
    for strategy, colours in zip(RELAXED_STRATEGIES, ("Blues", "Oranges"), strict=True):
        shown = [r for r in rows if r["case"] == f"{strategy}, k = 2, average"] + [
            r for r in rows if r.get("relaxed") and r["case"].startswith(strategy + ",")
        ]
        shades = plt.get_cmap(colours)(
            [0.3 + 0.7 * i / (len(shown) - 1) for i in range(len(shown))]
        )
        for i, (r, shade) in enumerate(zip(shown, shades, strict=True)):
            draw(axes[1], r, color=shade, linestyle="--" if i == 0 else "-")
    for ax, title in zip(axes, ("strict ties", "relaxed ties (k = 2, average init)"), strict=True):
        ax.set_xlabel("uptraining steps after conversion")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("held-out cross-entropy")
    fig.suptitle(f"Converting a trained {args.n}-layer model into a recursive one")
    fig.tight_layout()
    fig.savefig(out / "recursive_conversion.png", dpi=120)


if __name__ == "__main__":
    main()

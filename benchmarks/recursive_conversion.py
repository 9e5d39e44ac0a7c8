"""Converting a trained untied model into a recursive one: sharing strategies and initialisations.

The model is the Universal Transformer example's (`examples/universal_transformer.py`): `n`
layers of (attention, FFN) scanned over stacked weights, trained untied on multi-digit
addition. Each case then shares whole layers (attention and FFN) among `k` blocks with
`tt.share_layers("blocks", strategy, layers=n, blocks=k, stacked=True, init=...)`, packs the
trained model (the conversion), and uptrains it. For each case, in one run:

- the parameter count of the packed model;
- the held-out loss right after the conversion, and after `--uptrain` steps;
- the untied model trained for the same extra steps, as the reference row.

Then the compile time of one tied training step for a cycled model at growing depth (flat in
`L` under `lax.scan`: the body is traced once). Writes
`results/recursive_conversion.{json,md,png}` (the plot needs matplotlib, the `benchmarks`
extra).

    python benchmarks/recursive_conversion.py [--n 6] [--steps 800] [--uptrain 60]
"""

import argparse
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import optax


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import universal_transformer as ut  # noqa: E402

import tietransform as tt  # noqa: E402


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


def heldout_loss(objective, model, key, batch: int, digits: int) -> float:
    tokens, targets = ut.addition_batch(key, batch, digits)
    return float(objective(model, tokens, targets)[0])


def count_parameters(model) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


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
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results"
    (out / "recursive_conversion.md").write_text(text + "\n")
    (out / "recursive_conversion.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "compile_seconds": compiles}, indent=2)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[benchmarks]')")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ax.plot([0, args.uptrain], [r["loss_converted"], r["loss_uptrained"]], marker="o",
                label=f"{r['case']} ({r['parameters'] / 1e3:.0f}k params)")  # fmt: skip
    ax.set_xlabel("uptraining steps after conversion")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"Converting a trained {args.n}-layer model into a recursive one")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recursive_conversion.png", dpi=120)


if __name__ == "__main__":
    main()

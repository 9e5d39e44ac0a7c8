"""The first `tt.pack` in a fresh process, for the seed model (the Universal Transformer example,
`tt.TieSpec(ffn=tt.stack("blocks.mlp"))`), at several n.

Each measurement is a fresh Python process: it builds the model (not timed), then times its
first `tt.pack` and a second one. With `--baseline REV`, the same child also runs against the
tietransform of git revision REV (checked out into a temporary worktree), interleaved with the
current one, so that both are measured side by side in one run on the same machine. Writes
`results/first_pack.{json,md}`.

    python benchmarks/first_pack.py [--ns 8,32] [--runs 5] [--baseline be0c294]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile


ROOT = pathlib.Path(__file__).resolve().parents[1]

_CHILD = """
import sys, time
sys.path.insert(0, {examples!r})
import equinox as eqx, jax
import universal_transformer as ut
import tietransform as tt
assert tt.__file__.startswith({tree!r}), tt.__file__
model = eqx.filter_jit(ut.build)({n}, 64, 8, jax.random.key(0))
jax.block_until_ready(model)
times = []
for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(tt.pack(model, tt.TieSpec(ffn=tt.stack("blocks.mlp"))))
    times.append(time.perf_counter() - start)
print(times[0], times[1])
"""


def measure(tree: pathlib.Path, n: int) -> tuple[float, float]:
    """(first, second) pack seconds in a fresh process importing tietransform from `tree`."""
    code = _CHILD.format(examples=str(ROOT / "examples"), tree=str(tree), n=n)
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"the child process failed:\n{out.stderr}")
    first, second = out.stdout.split()
    return float(first), float(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="8,32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a git revision to compare with")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    trees = {"current": ROOT}
    with tempfile.TemporaryDirectory() as scratch:
        if args.baseline:
            base = pathlib.Path(scratch) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                check=True,
                capture_output=True,
            )
            trees[f"baseline {args.baseline}"] = base
        try:
            samples = {(name, n): [] for name in trees for n in ns}
            for _ in range(args.runs):  # interleaved, so drift hits every variant alike
                for n in ns:
                    for name, tree in trees.items():
                        samples[name, n].append(measure(tree, n))
        finally:
            if args.baseline:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                    check=False,
                )
    rows = []
    for (name, n), values in samples.items():
        first = statistics.median(v[0] for v in values)
        second = statistics.median(v[1] for v in values)
        rows.append(
            {"tietransform": name, "n": n, "first_ms": 1e3 * first, "second_ms": 1e3 * second}
        )
    lines = [
        f"First `tt.pack` in a fresh process, seed model (median of {args.runs} processes):",
        "",
        "| tietransform | n | first pack ms | second pack ms |",
        "|---|---|---|---|",
        *(
            f"| {r['tietransform']} | {r['n']} | {r['first_ms']:.1f} | {r['second_ms']:.1f} |"
            for r in rows
        ),
    ]
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results"
    (out / "first_pack.json").write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=2))
    (out / "first_pack.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""One Universal Transformer with a shared FFN, five ways, for n repetitions.

The model is `examples/universal_transformer.py`'s: n repetitions of (attention, FFN), one FFN
shared by all of them, each repetition with its own attention. Variants, built from one set of
weights:

1. `nested_shared`: blocks in a list, one `eqx.nn.Shared` per shared FFN leaf per repetition
   (4 (n - 1) of them, nested); the loop over repetitions is unrolled (a list cannot be scanned).
2. `hand_unrolled`: the maintainers' suggestion (Equinox #790): the FFN is passed at call time;
   blocks in a list, unrolled loop.
3. `hand_scanned`: as 2, with the attentions stacked and `lax.scan` over them. The baseline.
4. `untied`: stacked attention and n stacked FFNs, scanned (nothing shared).
5. `tie`: 4 with `tt.TieSpec(ffn=tt.stack("blocks.mlp"))`, `tt.pack` and `tt.tie`.

Checks that all variants agree (loss, and the shared FFN's gradient, summed over repetitions for
`untied`), then measures, per n: build (assembling the variant from the weights; `tt.pack` for
`tie`), trace, lower+compile, the jitted loss+grad step, an eager (un-jitted) loss call, parameter
and Adam-state bytes, compiled temp memory, and whether a rebuilt model retraces. Writes
`results/seed_comparison.{json,md,png}`.

Trace and compile times are measured in a fresh Python process per (variant, n), after a
warm-up compile and one untimed trace of the variant (Python-side caches warm). In one
long-lived process, compiles slow down after large ones (the unrolled variants compile for over
a minute at n=32): the scanned baseline's compile grew from 1.8 s at n=2 to 2.8 s at n=32 over
one run, where a fresh process compiles it in 1.8-2.0 s at any n.

    python benchmarks/seed_comparison.py [--ns 2,4,8,16,32] [--quick]
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tietransform as tt
from tietransform.testing import tolerance


sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import universal_transformer as ut  # noqa: E402


RESULTS = pathlib.Path(__file__).parent / "results"
VARIANTS = ("nested_shared", "hand_unrolled", "hand_scanned", "untied", "tie")
BASELINE = "hand_scanned"
FFN_LEAVES = ("w1", "b1", "w2", "b2")


# -- the variants' models ---------------------------------------------------------------------


class Unrolled(eqx.Module):
    """Blocks in a list, an unrolled loop; each block's FFN, or one passed at call time."""

    embed: eqx.nn.Embedding
    position: jax.Array
    attns: list[ut.Attention]
    mlps: list[ut.FFN] | None
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __call__(self, tokens: jax.Array, mlp: ut.FFN | None = None) -> jax.Array:
        h = jax.vmap(self.embed)(tokens) + self.position
        for i, attn in enumerate(self.attns):
            h = ut._repetition(h, ut.Blocks(attn, mlp if self.mlps is None else self.mlps[i]))
        return jax.vmap(lambda x: self.head(self.norm(x)))(h)


class Scanned(eqx.Module):
    """Stacked attentions, `lax.scan` over them; the one FFN passed at call time."""

    embed: eqx.nn.Embedding
    position: jax.Array
    attn: ut.Attention
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __call__(self, tokens: jax.Array, mlp: ut.FFN) -> jax.Array:
        h = jax.vmap(self.embed)(tokens) + self.position
        params, static = eqx.partition(self.attn, eqx.is_array)

        def step(h: jax.Array, attn: ut.Attention) -> tuple[jax.Array, None]:
            return ut._repetition(h, ut.Blocks(eqx.combine(attn, static), mlp)), None

        return jax.vmap(lambda x: self.head(self.norm(x)))(jax.lax.scan(step, h, params)[0])


def _unwrap(tree: Any) -> Any:
    """The model inside nested `eqx.nn.Shared` wrappers (their `pytree` fields)."""
    while isinstance(tree, eqx.nn.Shared):
        tree = tree.pytree
    return tree


def _materialise(tree: Any) -> Any:
    """Calls each nested `eqx.nn.Shared` in turn, restoring its tied leaf."""
    while isinstance(tree, eqx.nn.Shared):
        tree = tree()
    return tree


def nest_shared(model: Unrolled) -> Any:
    """One `eqx.nn.Shared` per FFN leaf per repetition `i >= 1`, tying it to repetition 0's."""
    assert model.mlps is not None
    tree: Any = model
    for i in range(1, len(model.mlps)):
        for name in FFN_LEAVES:
            tree = eqx.nn.Shared(
                tree,
                where=lambda t, i=i, name=name: getattr(_unwrap(t).mlps[i], name),
                get=lambda t, name=name: getattr(_unwrap(t).mlps[0], name),
            )
    return tree


# -- weights and builders ---------------------------------------------------------------------


@dataclasses.dataclass
class Weights:
    """One set of weights every variant is built from; `template` is an untied example model."""

    template: ut.UniversalTransformer
    mlp: ut.FFN
    n: int


def make_weights(n: int, width: int, digits: int, key: jax.Array) -> Weights:
    template = eqx.filter_jit(ut.build)(n, width, digits, key)
    mlp = jax.tree.map(lambda a: a[0], template.blocks.mlp)
    return Weights(template, mlp, n)


def _unstack(stacked: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


def _unrolled(w: Weights, mlps: list[ut.FFN] | None) -> Unrolled:
    t = w.template
    return Unrolled(t.embed, t.position, _unstack(t.blocks.attn, w.n), mlps, t.norm, t.head)


def _untied(w: Weights) -> ut.UniversalTransformer:
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (w.n, *a.shape)), w.mlp)
    return eqx.tree_at(lambda m: m.blocks.mlp, w.template, stacked)


BUILDERS: dict[str, Callable[[Weights], Any]] = {
    "nested_shared": lambda w: nest_shared(_unrolled(w, [w.mlp] * w.n)),
    "hand_unrolled": lambda w: (_unrolled(w, None), w.mlp),
    "hand_scanned": lambda w: (
        Scanned(
            w.template.embed,
            w.template.position,
            w.template.blocks.attn,
            w.template.norm,
            w.template.head,
        ),
        w.mlp,
    ),
    "untied": _untied,
    "tie": lambda w: tt.pack(_untied(w), ut.SPEC),
}


# -- losses and the shared FFN's gradient -----------------------------------------------------


def _xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _loss_nested(params: Any, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    return _xent(jax.vmap(_materialise(params))(tokens), targets)


def _loss_hand(params: tuple[Any, ut.FFN], tokens: jax.Array, targets: jax.Array) -> jax.Array:
    model, mlp = params
    return _xent(jax.vmap(lambda t: model(t, mlp))(tokens), targets)


def _loss_untied(
    model: ut.UniversalTransformer, tokens: jax.Array, targets: jax.Array
) -> jax.Array:
    return _xent(jax.vmap(model)(tokens), targets)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "nested_shared": _loss_nested,
    "hand_unrolled": _loss_hand,
    "hand_scanned": _loss_hand,
    "untied": _loss_untied,
    "tie": tt.tie(_loss_untied, ut.SPEC),
}


def shared_ffn_grad(name: str, grads: Any) -> list[np.ndarray]:
    """The gradient with respect to the one shared FFN, as arrays in `FFN_LEAVES` order."""
    if name == "nested_shared":
        mlp = _unwrap(grads).mlps[0]
    elif name in ("hand_unrolled", "hand_scanned"):
        mlp = grads[1]
    elif name == "untied":
        mlp = jax.tree.map(lambda a: a.sum(axis=0), grads.blocks.mlp)
    else:
        mlp = jax.tree.map(
            lambda s: s.data[0], grads.blocks.mlp, is_leaf=lambda x: isinstance(x, tt.StackedLeaf)
        )
    return [np.asarray(getattr(mlp, leaf)) for leaf in FFN_LEAVES]


# -- measurements -----------------------------------------------------------------------------


def _median_time(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, budget_s: float = 3.0
) -> float:
    """Median wall time of `fn()` over `repeats` calls, or fewer (at least 3) past `budget_s`."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def _step_fn(name: str, static: Any) -> Callable:
    """`(arrays, tokens, targets) -> (loss, grads)`, a fresh function object (no jit cache)."""
    loss = LOSSES[name]

    def step(arrays: Any, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, Any]:
        return jax.value_and_grad(lambda a: loss(eqx.combine(a, static), tokens, targets))(arrays)

    return step


@dataclasses.dataclass
class Compiled:
    """A variant's compiled step, and what compiling it took."""

    executable: Any
    arrays: Any
    trace_s: float
    compile_s: float
    temp_bytes: int


def compile_step(
    name: str, params: Any, batch: tuple[jax.Array, jax.Array], repeats: int, budget_s: float = 10.0
) -> Compiled:
    """Trace, lower and compile a fresh step `repeats` times (fewer past `budget_s`); medians."""
    arrays, static = eqx.partition(params, eqx.is_array)
    traces: list[float] = []
    compiles: list[float] = []
    while len(traces) < repeats and (not traces or sum(traces) + sum(compiles) < budget_s):
        start = time.perf_counter()
        traced = jax.jit(_step_fn(name, static)).trace(arrays, *batch)
        traces.append(time.perf_counter() - start)
        start = time.perf_counter()
        executable = traced.lower().compile()
        compiles.append(time.perf_counter() - start)
    temp = int(executable.memory_analysis().temp_size_in_bytes)
    return Compiled(
        executable, arrays, statistics.median(traces), statistics.median(compiles), temp
    )


def _warm_up_compiler() -> None:
    """A small scanned loss+grad compile, so that no variant pays the compiler's first use."""

    def loss(stacked: jax.Array) -> jax.Array:
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), jnp.ones(4), stacked)
        return h.sum()

    jax.jit(jax.grad(loss)).trace(jnp.ones((2, 4, 4))).lower().compile()


def cold_compile_times(name: str, n: int, args: argparse.Namespace) -> tuple[float, float]:
    """`(trace_s, compile_s)` of variant `name` at `n`, measured in a fresh Python process."""
    command = [
        sys.executable,
        __file__,
        "--compile-child",
        f"{name}:{n}",
        f"--width={args.width}",
        f"--digits={args.digits}",
        f"--batch={args.batch}",
        f"--trace-repeats={args.trace_repeats}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compile child for {name} at n={n} failed:\n{done.stderr[-4000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return times["trace_s"], times["compile_s"]


def _compile_child(target: str, args: argparse.Namespace) -> None:
    """Child process: prints `{"trace_s": ..., "compile_s": ...}` for `name:n` as its last line."""
    name, n = target.split(":")
    weights = make_weights(int(n), args.width, args.digits, jax.random.key(0))
    batch = ut.addition_batch(jax.random.key(2), args.batch, args.digits)
    params = BUILDERS[name](weights)
    _warm_up_compiler()
    jax.jit(_step_fn(name, eqx.partition(params, eqx.is_array)[1])).trace(
        eqx.filter(params, eqx.is_array), *batch
    )  # an untimed first trace: Python-side caches (Equinox, JAX) warm, as in a training loop
    c = compile_step(name, params, batch, args.trace_repeats)
    print(json.dumps({"trace_s": c.trace_s, "compile_s": c.compile_s}))


def retraces_on_rebuild(
    name: str, weights: Weights, rebuilt: Weights, batch: tuple[jax.Array, jax.Array]
) -> int:
    """How many extra traces `eqx.filter_jit` makes when the model is rebuilt from new weights."""
    count = [0]
    loss = LOSSES[name]

    @eqx.filter_jit
    def step(params: Any, tokens: jax.Array, targets: jax.Array) -> Any:
        count[0] += 1
        return eqx.filter_value_and_grad(loss)(params, tokens, targets)

    jax.block_until_ready(step(BUILDERS[name](weights), *batch))
    before = count[0]
    jax.block_until_ready(step(BUILDERS[name](rebuilt), *batch))
    return count[0] - before


def check_agreement(params: dict[str, Any], batch: tuple[jax.Array, jax.Array], n: int) -> None:
    """All variants give the same loss and the same gradient for the shared FFN (f32 tolerance)."""
    values, ffn_grads = {}, {}
    for name, p in params.items():
        value, grads = eqx.filter_jit(eqx.filter_value_and_grad(LOSSES[name]))(p, *batch)
        values[name], ffn_grads[name] = float(value), shared_ffn_grad(name, grads)
    tol = max(1e-5, tolerance(jnp.float32, n))
    for name in params:
        assert abs(values[name] - values[BASELINE]) <= tol * abs(values[BASELINE]), (name, values)
        for leaf, got, want in zip(FFN_LEAVES, ffn_grads[name], ffn_grads[BASELINE], strict=True):
            err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
            assert err <= tol, f"{name}: FFN gradient {leaf} differs from {BASELINE} by {err:.3g}"


def measure_n(n: int, args: argparse.Namespace, check_retrace: bool) -> dict[str, dict[str, Any]]:
    """Every metric for every variant at `n` repetitions."""
    weights = make_weights(n, args.width, args.digits, jax.random.key(0))
    rebuilt = make_weights(n, args.width, args.digits, jax.random.key(1))
    batch = ut.addition_batch(jax.random.key(2), args.batch, args.digits)
    params = {name: BUILDERS[name](weights) for name in VARIANTS}
    check_agreement(params, batch, n)
    out: dict[str, dict[str, Any]] = {}
    compiled = {}
    for name in VARIANTS:
        c = compile_step(name, params[name], batch, repeats=1)
        c.trace_s, c.compile_s = cold_compile_times(name, n, args)
        compiled[name] = c
        state = optax.adam(1e-3).init(eqx.filter(params[name], eqx.is_array))
        out[name] = {
            "build_s": _median_time(
                lambda name=name: BUILDERS[name](weights), args.build_repeats, warmup=0
            ),
            "trace_s": c.trace_s,
            "compile_s": c.compile_s,
            "eager_s": _median_time(
                lambda name=name: LOSSES[name](params[name], *batch), args.eager_repeats
            ),
            "param_bytes": _nbytes(params[name]),
            "opt_state_bytes": _nbytes(state),
            "temp_bytes": c.temp_bytes,
            "retraces_on_rebuild": (
                retraces_on_rebuild(name, weights, rebuilt, batch)
                if check_retrace or name == "tie"
                else None
            ),
        }
        print(
            f"  n={n:<3} {name:14} trace {c.trace_s:7.3f} s  compile {c.compile_s:7.3f} s",
            flush=True,
        )
    out["tie"]["pack_cold_s"] = _cold_pack_seconds(weights)
    steps = _interleaved_step_times(compiled, batch, args.step_repeats)
    for name in VARIANTS:
        out[name]["step_s"] = steps[name]
    return out


def _cold_pack_seconds(weights: Weights) -> float:
    """`tt.pack` with a fresh `TieSpec` (its plan not yet resolved): the first pack's cost."""
    model = _untied(weights)
    start = time.perf_counter()
    jax.block_until_ready(tt.pack(model, tt.TieSpec(ffn=tt.stack("blocks.mlp"))))
    return time.perf_counter() - start


def _interleaved_step_times(
    compiled: dict[str, Compiled], batch: Any, repeats: int
) -> dict[str, float]:
    """Median step times, variants interleaved so that load drift hits them alike."""
    for c in compiled.values():
        for _ in range(3):
            jax.block_until_ready(c.executable(c.arrays, *batch))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c.executable(c.arrays, *batch))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# -- reporting --------------------------------------------------------------------------------


COLUMNS = (
    ("build_s", "build ms", 1e3),
    ("trace_s", "trace ms", 1e3),
    ("compile_s", "compile ms", 1e3),
    ("step_s", "step ms", 1e3),
    ("eager_s", "eager ms", 1e3),
    ("param_bytes", "params KiB", 1 / 1024),
    ("opt_state_bytes", "Adam KiB", 1 / 1024),
    ("temp_bytes", "temp KiB", 1 / 1024),
)


def markdown(results: dict[str, Any]) -> str:
    head = [
        "variant",
        *[label for _, label, _ in COLUMNS],
        "step/base",
        "(trace+compile)/base",
        "retraces",
    ]
    lines = []
    for n, by_variant in results["by_n"].items():
        lines += [f"\n### n = {n}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = by_variant[BASELINE]
        for name in VARIANTS:
            r = by_variant[name]
            cells = [name, *[f"{r[key] * scale:.3g}" for key, _, scale in COLUMNS]]
            cells.append(f"{r['step_s'] / base['step_s']:.3f}")
            cells.append(
                f"{(r['trace_s'] + r['compile_s']) / (base['trace_s'] + base['compile_s']):.2f}"
            )
            cells.append("-" if r["retraces_on_rebuild"] is None else str(r["retraces_on_rebuild"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets for `tie`, each met or not."""
    by_n = results["by_n"]
    ns = sorted(by_n, key=int)
    tie = {n: by_n[n]["tie"] for n in ns}
    base = {n: by_n[n][BASELINE] for n in ns}
    tc = {n: tie[n]["trace_s"] + tie[n]["compile_s"] for n in ns}
    one_ffn = all(
        by_n[n]["tie"]["param_bytes"] == by_n[n][BASELINE]["param_bytes"]
        and by_n[n]["tie"]["opt_state_bytes"] == by_n[n][BASELINE]["opt_state_bytes"]
        for n in ns
    )
    out = {
        "step within 1.05x of hand_scanned at every n": all(
            tie[n]["step_s"] <= 1.05 * base[n]["step_s"] for n in ns
        ),
        "trace+compile within 1.5x of hand_scanned at every n": all(
            tc[n] <= 1.5 * (base[n]["trace_s"] + base[n]["compile_s"]) for n in ns
        ),
        f"trace+compile flat in n (max/min <= 1.5; tie {_spread(tc):.2f}, {BASELINE} "
        f"{_spread({n: base[n]['trace_s'] + base[n]['compile_s'] for n in ns}):.2f})": (
            _spread(tc) <= 1.5
        ),
        "no retrace when the tied model is rebuilt": all(
            tie[n]["retraces_on_rebuild"] == 0 for n in ns
        ),
        "one FFN's worth of parameter and Adam-state bytes": one_ffn,
    }
    if "32" in by_n:
        nested = by_n["32"]["nested_shared"]
        factor = (nested["trace_s"] + nested["compile_s"]) / tc["32"]
        out[f">= 20x below nested Shared's trace+compile at n=32 ({factor:.1f}x)"] = factor >= 20
        out["build+pack under 10 ms at n=32"] = tie["32"]["build_s"] < 1e-2
    return out


def _spread(values: dict[str, float]) -> float:
    return max(values.values()) / min(values.values())


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(results["by_n"], key=int)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for ax, (key, label, scale) in zip(axes.flat, COLUMNS, strict=True):
        for name in VARIANTS:
            ys = [results["by_n"][n][name][key] * scale for n in ns]
            ax.plot([int(n) for n in ns], ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="repetitions n", title=label)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks([int(n) for n in ns], ns)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Shared FFN five ways ({results['device']}, jax {results['jax']})")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="2,4,8,16,32", help="comma-separated repetition counts")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--digits", type=int, default=8, help="sequence length is digits + 1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "seed_comparison"), help="output path stem")
    parser.add_argument("--from-json", action="store_true", help="rewrite .md and .png from .json")
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    parser.add_argument("--trace-repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        write_reports(json.loads(pathlib.Path(args.out).with_suffix(".json").read_text()), args.out)
        return
    if args.compile_child:
        _compile_child(args.compile_child, args)
        return
    reps = (3, 1, 3, 5) if args.quick else (30, 3, 10, 50)
    args.build_repeats, trace_repeats, args.eager_repeats, args.step_repeats = reps
    args.trace_repeats = args.trace_repeats or trace_repeats
    ns = [int(n) for n in args.ns.split(",")]
    device = jax.devices()[0].device_kind
    print(
        f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, f32; "
        f"width {args.width}, hidden {4 * args.width}, batch {args.batch}x{args.digits + 1}; "
        f"n in {ns}"
    )
    results: dict[str, Any] = {
        "device": device,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "by_n": {},
    }
    for n in ns:
        results["by_n"][str(n)] = measure_n(n, args, check_retrace=n == ns[0])
        results.setdefault("load_average_1min", {})[str(n)] = os.getloadavg()[0]
    write_reports(results, args.out)


def write_reports(results: dict[str, Any], out: str) -> None:
    """Prints the table and the targets; writes `out` + `.json`, `.md`, `.png`."""
    results["targets"] = targets(results)
    table = markdown(results)
    print(table)
    for goal, met in results["targets"].items():
        print(f"{'MET ' if met else 'MISS'}  {goal}")
    stem = pathlib.Path(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(_md_header(results) + table + _md_targets(results))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")


def _md_header(results: dict[str, Any]) -> str:
    a = results["args"]
    return (
        f"# Shared FFN five ways\n\n{results['device']}, jax {results['jax']}, Python "
        f"{results['python']}, f32; width {a['width']}, hidden {4 * a['width']}, batch "
        f"{a['batch']}x{a['digits'] + 1}. Times are medians; ratios are to `{BASELINE}`. "
        "`retraces`: extra traces when the model is rebuilt from new weights ('-': not measured). "
        "Trace and compile: each variant in a fresh process, after a warm-up compile and trace.\n"
        + _md_load(results)
    )


def _md_load(results: dict[str, Any]) -> str:
    load = results.get("load_average_1min")
    if not load:
        return ""
    shown = ", ".join(f"n={n}: {value:.1f}" for n, value in load.items())
    return f"\nMachine load (1-minute load average after each n; {os.cpu_count()} CPUs): {shown}.\n"


def _md_targets(results: dict[str, Any]) -> str:
    lines = ["\n## Targets for `tie`\n"]
    lines += [
        f"- {'met' if met else '**missed**'}: {goal}" for goal, met in results["targets"].items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

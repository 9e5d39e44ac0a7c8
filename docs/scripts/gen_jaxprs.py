"""Writes `docs/generated/`: the jaxprs and tables that docs/how-it-works.md and benchmarks.md show.

    python docs/scripts/gen_jaxprs.py

Run it with the JAX version CI builds the docs with (the Python 3.11 environment); jaxpr text
and compiled memory change between JAX releases, so those files record the version in their
first line. `tests/test_docs.py` checks that the committed files are what this script writes.
"""

import json
import pathlib

import jax
import jax.numpy as jnp

import tietransform as tt


DOCS = pathlib.Path(__file__).resolve().parents[1]
GENERATED = DOCS / "generated"
RESULTS = DOCS.parent / "benchmarks" / "results"
VERSIONED = ("plain_tie.txt", "stack_before.txt", "stack_after.txt", "stack_memory.md")


def _header() -> str:
    return f"# jax {jax.__version__}; written by docs/scripts/gen_jaxprs.py\n"


def recorded_version() -> str | None:
    """The JAX version that wrote the committed version-dependent files."""
    first = (
        (GENERATED / VERSIONED[0]).read_text().split("\n", 1)[0]
        if (GENERATED / VERSIONED[0]).exists()
        else ""
    )
    return first.split()[2].rstrip(";") if first.startswith("# jax ") else None


# --- A plain tie: two blocks, one shared MLP. ---------------------------------------------------


def _blocks(params, x, mlps):
    for attn, mlp in zip(params["attn"], mlps, strict=True):
        x = jnp.tanh(x @ attn)
        x = x + jnp.tanh(x @ mlp["w1"]) @ mlp["w2"]
    return jnp.sum(x)


def untied_loss(params, x):
    """Written as if nothing were tied: block `i` reads its own MLP."""
    return _blocks(params, x, params["mlp"])


def hand_written_loss(params, x):
    """The usual workaround: one MLP in the params, passed to every block."""
    return _blocks(params, x, [params["mlp"]] * len(params["attn"]))


def _buffers_only(fn, spec, packed):
    """`fn(packed, x)` as a function of the packed params' non-empty arrays: the zero-size layout
    records are closed over (`tie` reads only their shapes, so they are no input of the jaxpr)."""
    is_record = lambda x: hasattr(x, "size") and x.size == 0  # noqa: E731
    records = jax.tree.map(lambda x: x if is_record(x) else None, packed)
    arrays = jax.tree.map(lambda x: None if is_record(x) else x, packed)
    merge = lambda a: jax.tree.map(  # noqa: E731
        lambda x, r: r if x is None else x, a, records, is_leaf=lambda x: x is None
    )
    return (lambda a, x: fn(merge(a), x)), arrays


def _plain_tie() -> str:
    d, h = 2, 3
    ones = lambda *shape: jnp.ones(shape)  # noqa: E731
    params = {"attn": [ones(d, d), ones(d, d)], "mlp": [{"w1": ones(d, h), "w2": ones(h, d)}] * 2}
    spec = tt.TieSpec(ffn="mlp[*]")
    packed = tt.pack(params, spec)
    tied_fn, arrays = _buffers_only(tt.tie(untied_loss, spec), spec, packed)
    tied = str(jax.make_jaxpr(tied_fn)(arrays, ones(d)))
    hand = str(jax.make_jaxpr(hand_written_loss)({**params, "mlp": params["mlp"][0]}, ones(d)))
    assert tied == hand, f"the tied jaxpr differs from the hand-written one:\n{tied}\n---\n{hand}"
    return tied


# --- A stacked tie: one (d, d) layer shared by all L iterations of a scan. ------------------------


def stack_loss(params, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return jnp.sum(jax.lax.scan(layer, x, params["w"])[0])


def _stack_jaxprs() -> tuple[str, str]:
    spec = tt.TieSpec(shared=tt.stack("w"))
    packed = tt.pack({"w": jnp.ones((8, 2, 2))}, spec)
    x = jnp.ones(2)
    unpacked_fn, arrays = _buffers_only(lambda p, x: stack_loss(tt.unpack(p, spec), x), spec, packed)
    tied_fn, _ = _buffers_only(tt.tie(stack_loss, spec), spec, packed)
    before = jax.make_jaxpr(unpacked_fn)(arrays, x)
    after = jax.make_jaxpr(tied_fn)(arrays, x)
    return str(before), str(after)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _stack_memory() -> str:
    length, d = 32, 512
    spec = tt.TieSpec(shared=tt.stack("w"))
    packed = tt.pack({"w": jax.random.normal(jax.random.key(0), (length, d, d)) / d**0.5}, spec)
    x = jax.random.normal(jax.random.key(1), (8, d))
    materialised = lambda p, x: stack_loss(tt.unpack(p, spec), x)  # noqa: E731
    tied = tt.tie(stack_loss, spec)

    def temp(fn):
        return jax.jit(fn).lower(packed, x).compile().memory_analysis().temp_size_in_bytes

    rows = [
        ("forward", temp(materialised), temp(tied)),
        ("gradient", temp(jax.grad(materialised)), temp(jax.grad(tied))),
    ]
    lines = [
        f"| L={length}, d={d}, f32 (one slice: {_mib(d * d * 4)} MiB) "
        "| unpack, then scan (MiB) | `tie` (MiB) |",
        "|---|---|---|",
        *[f"| {name} | {_mib(a)} | {_mib(b)} |" for name, a, b in rows],
    ]
    lines += ["", f"`compiled.memory_analysis().temp_size_in_bytes` on CPU, jax {jax.__version__}."]
    return "\n".join(lines) + "\n"


# --- Benchmark tables from benchmarks/results/*.json. --------------------------------------------


def _tie_overhead() -> str:
    data = json.loads((RESULTS / "tie_overhead.json").read_text())
    a = data["args"]
    names = {
        "tied": "`tie` (an MLP per block, tied)",
        "hand": "hand-written (one MLP passed in)",
        "untied": "untied (an MLP per block)",
    }
    lines = [
        f"Device `{data['device']}`, jax {data['jax']}; {a['blocks']} blocks, width {a['width']}, "
        f"sequence {a['seq']}, batch {a['batch']}; "
        f"median of {a['repeats']} jitted loss+grad steps.",
        "",
        "| variant | HLO parameters | step (ms) | time / hand-written |",
        "|---|---|---|---|",
    ]
    for key in ("tied", "hand", "untied"):
        v = data["variants"][key]
        lines.append(
            f"| {names[key]} | {v['hlo_parameters']} | {1000 * v['step_seconds_median']:.1f} | "
            f"{v['ratio_to_hand']:.2f} |"
        )
    dispatch = data.get("dispatch")
    if dispatch:
        blocks = a.get("dispatch_blocks")
        lines += [
            "",
            f"Per call, all dispatch (the same model at {blocks} blocks of width 8, through "
            f"`eqx.filter_jit`; median of {a.get('dispatch_calls')} calls):",
            "",
            "| variant | leaves | array leaves | call (ms) | time / untied |",
            "|---|---|---|---|---|",
        ]
        untied = dispatch["untied"]["call_seconds_median"]
        for key in ("tied", "untied"):
            v = dispatch[key]
            lines.append(
                f"| {names[key]} | {v['leaves']} | {v['array_leaves']} | "
                f"{1000 * v['call_seconds_median']:.3f} | {v['call_seconds_median'] / untied:.2f} |"
            )
    return "\n".join(lines) + "\n"


def generate(only_version_independent: bool = False) -> dict[str, str]:
    """File name to contents, for everything under `docs/generated/`."""
    files = {"tie_overhead.md": _tie_overhead()}
    if not only_version_independent:
        before, after = _stack_jaxprs()
        files["plain_tie.txt"] = _header() + _plain_tie() + "\n"
        files["stack_before.txt"] = _header() + before + "\n"
        files["stack_after.txt"] = _header() + after + "\n"
        files["stack_memory.md"] = _stack_memory()
    return files


def main() -> None:
    GENERATED.mkdir(exist_ok=True)
    for name, text in generate().items():
        (GENERATED / name).write_text(text)
        print(f"wrote docs/generated/{name}")


if __name__ == "__main__":
    main()

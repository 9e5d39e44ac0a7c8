"""What the compiler sees: one parameter per buffer, the hand-written program, no L-fold copies."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import tietransform as tt
from tests.helpers import Stack, Tower, hlo_parameter_count, tower_loss


def _buffer_parameter_count(compiled_text: str) -> int:
    """Parameters of the ENTRY computation that hold at least one element.

    Packed params carry one zero-size layout record per tie group (no bytes). `jax.jit` drops
    unused inputs today, so they do not reach the program at all; counting only non-empty
    parameters keeps this test about buffers if a future `jit` (or `keep_unused=True`) keeps them.
    """
    entry = compiled_text[compiled_text.index("ENTRY") :]
    body = entry[: entry.index("\n}")]
    shapes = {
        m.group(2): m.group(1)
        for m in re.finditer(r"\w+\[([\d,]*)\][^=\n]* parameter\((\d+)\)", body)
    }
    return sum("0" not in dims.split(",") for dims in shapes.values())


def _hand_written_loss(model: Tower, mlp: eqx.nn.MLP, x: jax.Array) -> jax.Array:
    """The maintainers' advice: pass the one MLP at call time."""

    def run(x):
        for block in model.blocks:
            x = x + jnp.tanh(block.attn(x))
            x = x + mlp(x)
        return x

    return jnp.mean(jax.vmap(run)(x) ** 2)


def _compiled_text(fn, *args):
    arrays, static = eqx.partition(args, eqx.is_array)
    return jax.jit(lambda a: fn(*eqx.combine(a, static))).lower(arrays).compile().as_text()


def test_tied_tower_compiles_to_as_many_parameters_as_the_hand_written_one(getkey):
    tower = Tower(6, key=getkey())
    x = jax.random.normal(getkey(), (4, 8))
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    tied = _compiled_text(tt.tie(tower_loss, spec), tt.pack(tower, spec), x)
    hand = _compiled_text(
        _hand_written_loss,
        eqx.tree_at(lambda m: [b.mlp for b in m.blocks], tower, replace_fn=lambda _: None),
        tower.blocks[0].mlp,
        x,
    )
    untied = _compiled_text(tower_loss, tower, x)
    assert _buffer_parameter_count(tied) == _buffer_parameter_count(hand) == 6 * 2 + 4 + 1
    assert _buffer_parameter_count(untied) == 6 * 2 + 6 * 4 + 1


def test_layout_records_kept_by_jit_are_empty_parameters(getkey):
    tower = Tower(3, key=getkey())
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    arrays, static = eqx.partition(tt.pack(tower, spec), eqx.is_array)
    loss = tt.tie(tower_loss, spec)
    x = jax.random.normal(getkey(), (4, 8))
    kept = jax.jit(lambda a: loss(eqx.combine(a, static), x), keep_unused=True)
    text = kept.lower(arrays).compile().as_text()
    records = 1  # one layout record for the group (on its first TiedLeaf)
    assert hlo_parameter_count(text) == _buffer_parameter_count(text) + records
    assert _buffer_parameter_count(text) == 3 * 2 + 4


L, D = 32, 128
SLICE_BYTES = D * D * 4


@pytest.fixture
def stacked(getkey):
    spec = tt.TieSpec(shared=tt.stack("weight", list(range(L))))
    model = Stack(jax.random.normal(getkey(), (L, D, D)) / D**0.5)
    return spec, tt.pack(model, spec), jax.random.normal(getkey(), (4, D))


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_scan_over_a_stacked_tie_builds_no_L_fold_copy_forward(stacked):
    spec, packed, x = stacked
    tied = _temp_bytes(tt.tie(lambda m, x: m(x).sum(), spec), packed, x)
    materialised = _temp_bytes(lambda p, x: tt.unpack(p, spec)(x).sum(), packed, x)
    assert materialised >= L * SLICE_BYTES  # what building the stack costs
    assert tied < SLICE_BYTES  # no slice-sized buffer at all: the scan reads the one kept slice


def test_scan_over_a_stacked_tie_builds_no_L_fold_copy_in_the_gradient(stacked):
    spec, packed, x = stacked
    tied = _temp_bytes(jax.grad(tt.tie(lambda m, x: m(x).sum(), spec)), packed, x)
    materialised = _temp_bytes(jax.grad(lambda p, x: tt.unpack(p, spec)(x).sum()), packed, x)
    assert materialised >= 2 * L * SLICE_BYTES
    # A few slice-sized buffers (the accumulated cotangent, one slice being reread), not L of
    # them, plus the activations the backward needs (at most 4 per iteration here).
    activations = 4 * L * x.size * x.dtype.itemsize
    assert tied <= 4 * SLICE_BYTES + activations < materialised / 4

"""Packed params as users transform them before the call: mapped over an ensemble axis with
`jax.vmap` / `eqx.filter_vmap`, and cast as a whole to another float dtype (mixed precision).

The reference is always the untied function on the full model, its member gradients summed by
hand here (the view's pullback is a transpose of the last two axes).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close


ENSEMBLE = 3


def _swap(w):
    return jnp.swapaxes(w, -1, -2)


SPEC = tt.TieSpec(g=["a", "b"], v=tt.view("a", "c", _swap))


def _params(key, lead=()):
    k = jax.random.split(key, 4)
    return {
        "a": jax.random.normal(k[0], (*lead, 4, 5)),
        "b": jax.random.normal(k[1], (*lead, 4, 5)),
        "c": jax.random.normal(k[2], (*lead, 5, 4)),
        "d": jax.random.normal(k[3], (*lead, 5)),
    }


def f(m, x):
    h = jnp.tanh(x @ m["a"] + m["d"][None]) @ m["c"]
    return jnp.sum(h**2) + jnp.sum(jnp.sin(x @ m["b"]))


def _expected_grads(full_grads):
    """The packed gradient the untied member gradients sum to: `a` collects `b` and `c`'s."""
    g = full_grads
    return {"a": g["a"] + g["b"] + _swap(g["c"]), "d": g["d"]}


def _buffers(grads):
    return {"a": grads["a"], "d": grads["d"]}


@pytest.mark.parametrize("vmap", [jax.vmap, eqx.filter_vmap], ids=["jax.vmap", "eqx.filter_vmap"])
def test_vmap_over_a_packed_ensemble_equals_the_untied_ensemble(vmap, getkey):
    packed = tt.pack(_params(getkey(), (ENSEMBLE,)), SPEC)
    x = jax.random.normal(getkey(), (2, 4))
    full = tt.unpack(packed, SPEC)  # members of ensemble element i: its own canonical, viewed
    tied = tt.tie(f, SPEC)
    assert_trees_close(vmap(tied, in_axes=(0, None))(packed, x), jax.vmap(f, (0, None))(full, x))
    grads = vmap(jax.grad(tied), in_axes=(0, None))(packed, x)
    untied = jax.vmap(jax.grad(f), in_axes=(0, None))(full, x)
    assert_trees_close(_buffers(grads), _expected_grads(untied), summands=3)


def test_a_packed_ensemble_keeps_its_layout_records_mapped_with_their_buffers(getkey):
    packed = tt.pack(_params(getkey(), (ENSEMBLE,)), SPEC)
    records = [x for x in jax.tree.leaves(packed) if x.size == 0]
    assert len(records) == 2  # one per tie group
    assert all(r.shape[0] == ENSEMBLE for r in records)


def _cast(tree, dtype=jnp.bfloat16):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def test_a_packed_tree_cast_to_bfloat16_equals_the_untied_model_cast_the_same_way(getkey):
    packed = tt.pack(_params(getkey()), SPEC)
    x = jax.random.normal(getkey(), (2, 4), jnp.bfloat16)
    full = tt.unpack(packed, SPEC)
    tied = tt.tie(f, SPEC)
    got = tied(_cast(packed), x)
    assert got.dtype == jnp.bfloat16
    assert_trees_close(got, f(_cast(full), x))
    # Gradients with respect to the float32 packed params, through the cast.
    grads = jax.grad(lambda p: tied(_cast(p), x).astype(jnp.float32))(packed)
    untied = jax.grad(lambda m: f(_cast(m), x).astype(jnp.float32))(full)
    expected = _expected_grads(untied)
    # bfloat16: the tied program sums a's three member gradients in bfloat16 (in the cast's
    # transpose) where the untied one sums them in float32: a few bfloat16 roundings apart.
    for name in expected:
        scale = float(jnp.max(jnp.abs(expected[name])))
        error = float(jnp.max(jnp.abs(grads[name] - expected[name])))
        assert error <= tt.testing.tolerance(jnp.bfloat16, 3) * scale, (name, error, scale)


def test_a_packed_tree_cast_to_an_integer_dtype_says_to_cast_inside_the_tied_function(getkey):
    packed = tt.pack(_params(getkey()), SPEC)
    with pytest.raises(ValueError, match="cast inside the tied function"):
        tt.tie(f, SPEC)(_cast(packed, jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_vmap_over_an_ensemble_whose_view_moves_the_ensemble_axis_is_refused(getkey):
    # E == D, so `jnp.transpose` of the whole (E, D, D) ensemble fits the members' shape at
    # pack time, but it mixes ensemble members where the vmapped call transposes each alone.
    params = {"a": jax.random.normal(getkey(), (3, 3, 3)), "c": jnp.zeros((3, 3, 3))}
    spec = tt.TieSpec(v=tt.view("a", "c", jnp.transpose))
    packed = tt.pack(params, spec)
    tied = tt.tie(lambda m: jnp.sum(m["a"] @ m["c"]), spec)
    with pytest.raises(ValueError, match="does not act on trailing axes only"):
        jax.vmap(tied)(packed)

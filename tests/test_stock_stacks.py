"""`tt.stack` over stock Equinox modules stacked the standard way (`eqx.filter_vmap` over a
constructor, then `lax.scan` over `eqx.partition`ed params): the stacked array leaves are tied,
the modules' non-array leaves (an MLP's activations, a Dropout's float `p` and bool flag) pass
through unchanged, as in plain groups, and values and gradients equal the untied reference."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close


LAYERS = 3


class Scanned(eqx.Module):
    """A scan-over-layers model: `blocks` is one module whose arrays are stacked on axis 0."""

    blocks: eqx.Module

    def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def layer(h, xs):
            p, k = xs
            block = eqx.combine(p, static)
            if isinstance(block, eqx.nn.MultiheadAttention):
                return h + block(h, h, h, key=k), None
            return jax.vmap(block)(h), None

        return jax.lax.scan(layer, x, (params, jax.random.split(key, LAYERS)))[0]


def loss(model: Scanned, x: jax.Array, key: jax.Array) -> jax.Array:
    return jnp.mean(model(x, key) ** 2)


def mlp(key):
    return eqx.nn.MLP(4, 4, 8, depth=1, key=key)


def mlp_with_final_activation(key):
    return eqx.nn.MLP(4, 4, 8, depth=2, activation=jax.nn.gelu, final_activation=jnp.tanh, key=key)


def attention(key):
    return eqx.nn.MultiheadAttention(2, 4, dropout_p=0.25, use_query_bias=True, key=key)


MODULES = {"MLP": mlp, "MLP, final activation": mlp_with_final_activation, "attention": attention}


@functools.cache  # modules are immutable: build each stack once per session
def stacked(make) -> Scanned:
    return Scanned(eqx.filter_vmap(make)(jax.random.split(jax.random.key(0), LAYERS)))


def inputs():
    return jax.random.normal(jax.random.key(1), (5, 4)), jax.random.key(2)


SPEC = tt.TieSpec(shared=tt.stack("blocks"))


def non_arrays(tree):
    return [x for x in jax.tree.leaves(tree) if not eqx.is_array(x)]


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_a_stack_over_a_vmapped_stock_module_keeps_its_non_array_leaves(make):
    model = stacked(make)
    packed = tt.pack(model, SPEC)
    assert non_arrays(packed) == non_arrays(model)
    assert non_arrays(tt.unpack(packed, SPEC)) == non_arrays(model)


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_a_stack_over_a_vmapped_stock_module_keeps_one_slice_per_array(make):
    packed = tt.pack(stacked(make), SPEC)
    placeholders = jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, tt.StackedLeaf))
    stacked_leaves = [x for x in placeholders if isinstance(x, tt.StackedLeaf)]
    assert stacked_leaves
    assert all(np.shape(x.data)[0] == 1 and x.rows == (0,) * LAYERS for x in stacked_leaves)


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_scan_over_a_tied_stock_stack_gives_the_untied_value(make):
    packed = tt.pack(stacked(make), SPEC)
    x, key = inputs()
    tied = eqx.filter_jit(tt.tie(loss, SPEC))(packed, x, key)
    untied = eqx.filter_jit(loss)(tt.unpack(packed, SPEC), x, key)
    assert_trees_close(tied, untied, summands=LAYERS)


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_scan_over_a_tied_stock_stack_gives_each_slice_buffer_the_sum_of_layer_grads(make):
    packed = tt.pack(stacked(make), SPEC)
    x, key = inputs()
    tied = eqx.filter_jit(eqx.filter_grad(tt.tie(loss, SPEC)))(packed, x, key)
    untied = eqx.filter_jit(eqx.filter_grad(loss))(tt.unpack(packed, SPEC), x, key)
    is_stacked = lambda g: isinstance(g, tt.StackedLeaf)  # noqa: E731
    got = [g.data for g in jax.tree.leaves(tied, is_leaf=is_stacked) if is_stacked(g)]
    # Every slice reads the one kept row, so its gradient is the sum over the layers.
    expected = [jnp.sum(g, axis=0, keepdims=True) for g in jax.tree.leaves(untied)]
    assert len(got) == len(expected)
    assert_trees_close(got, expected, summands=LAYERS)


def test_a_stacked_array_without_the_layer_axis_is_refused_naming_it():
    model = stacked(mlp)
    bias = model.blocks.layers[0].bias
    model = eqx.tree_at(lambda m: m.blocks.layers[0].bias, model, bias[0])  # (8,), not (3, 8)
    with pytest.raises(ValueError, match="whose arrays do not share a leading axis") as error:
        tt.pack(model, SPEC)
    assert "blocks.layers[0].bias  f32[8]" in str(error.value)


def test_a_stacked_scalar_array_beside_stacked_arrays_is_refused_naming_it():
    model = Scanned({"w": jnp.ones((LAYERS, 2)), "scale": jnp.ones(())})
    with pytest.raises(ValueError, match="whose arrays do not share a leading axis") as error:
        tt.pack(model, SPEC)
    assert "blocks.scale  f32[]" in str(error.value)


def test_a_stack_that_selects_a_non_array_leaf_is_refused_naming_it():
    model = stacked(mlp)
    with pytest.raises(ValueError, match="selects blocks.activation") as error:
        tt.pack(model, tt.TieSpec(f=tt.stack("blocks.activation")))
    assert "which is not a stacked array" in str(error.value)


def test_a_stack_that_selects_a_subtree_without_arrays_is_refused():
    model = stacked(attention)
    with pytest.raises(ValueError, match="selects blocks.dropout, which holds no array"):
        tt.pack(model, tt.TieSpec(d=tt.stack("blocks.dropout")))


def test_describe_counts_only_the_stacked_arrays_of_a_stock_module():
    row = tt.describe(stacked(mlp), SPEC).splitlines()[1].split()
    assert row[:5] == ["shared", "stack", "3", "slices", "4"]  # 2 weights, 2 biases

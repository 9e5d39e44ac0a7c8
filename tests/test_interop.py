"""Optimizers and checkpoints see one copy of every tied buffer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tietransform as tt
from tests.helpers import Tower, array_bytes, assert_trees_close, tower_loss


SPEC = tt.TieSpec(ffn="blocks[*].mlp")


@pytest.fixture
def tower(getkey):
    return Tower(4, key=getkey())


def test_optax_state_on_packed_params_holds_one_copy_per_buffer(tower):
    packed = tt.pack(tower, SPEC)
    state = optax.adam(1e-3).init(eqx.filter(packed, eqx.is_array))
    untied_state = optax.adam(1e-3).init(eqx.filter(tower, eqx.is_array))
    one_mlp = array_bytes(tower.blocks[0].mlp)
    assert (
        array_bytes(untied_state) - array_bytes(state) == 2 * 3 * one_mlp
    )  # mu and nu, 3 MLPs fewer


def test_an_optax_step_on_packed_params_trains_the_tied_model(tower, getkey):
    x = jax.random.normal(getkey(), (8, 8))
    packed = tt.pack(tower, SPEC)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(eqx.filter(packed, eqx.is_array))
    loss = tt.tie(tower_loss, SPEC)

    @eqx.filter_jit
    def step(packed, state):
        value, grads = eqx.filter_value_and_grad(loss)(packed, x)
        updates, state = optimizer.update(grads, state, eqx.filter(packed, eqx.is_array))
        return eqx.apply_updates(packed, updates), state, value

    first = None
    # optax's Adam mixes Python floats with int32 step counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(5):
            packed, state, value = step(packed, state)
            first = value if first is None else first
    assert value < first
    full = tt.unpack(packed, SPEC)
    assert full.blocks[2].mlp.layers[1].weight is full.blocks[0].mlp.layers[1].weight


def test_serialised_packed_params_store_one_copy_and_reload(tower, tmp_path, getkey):
    packed = tt.pack(tower, SPEC)
    tied_file, untied_file = tmp_path / "tied.eqx", tmp_path / "untied.eqx"
    eqx.tree_serialise_leaves(tied_file, packed)
    eqx.tree_serialise_leaves(untied_file, tower)
    one_mlp = array_bytes(tower.blocks[0].mlp)
    assert untied_file.stat().st_size - tied_file.stat().st_size >= 3 * one_mlp
    skeleton = tt.pack(Tower(4, key=getkey()), SPEC)
    reloaded = eqx.tree_deserialise_leaves(tied_file, skeleton)
    x = jax.random.normal(getkey(), (3, 8))
    loss = tt.tie(tower_loss, SPEC)
    assert_trees_close(loss(reloaded, x), loss(packed, x))
    np.testing.assert_array_equal(
        reloaded.blocks[0].mlp.layers[0].weight, packed.blocks[0].mlp.layers[0].weight
    )


def test_weakly_typed_tied_scalars_survive_an_optax_step():
    # optax.apply_updates drops the weak type from the canonical buffer, as it would from every
    # member of an untied model; the packed params must still unpack and tie.
    spec = tt.TieSpec(g=["a", "b"])
    packed = tt.pack({"a": jnp.asarray(1.0), "b": jnp.asarray(1.0)}, spec)
    loss = tt.tie(lambda m: m["a"] * m["b"], spec)
    optimizer = optax.sgd(0.1)
    updates, _ = optimizer.update(jax.grad(loss)(packed), optimizer.init(packed), packed)
    stepped = optax.apply_updates(packed, updates)
    assert float(loss(stepped)) == pytest.approx(0.8**2)
    assert float(tt.unpack(stepped, spec)["b"]) == pytest.approx(0.8)


def test_numpy_float64_members_are_the_float32_arrays_jax_makes_of_them():
    spec = tt.TieSpec(g=["a", "b"])
    packed = tt.pack({"a": np.ones(2), "b": np.ones(2)}, spec)
    loss = tt.tie(lambda m: jnp.sum(m["a"] * m["b"]), spec)
    assert float(jax.jit(loss)(packed)) == float(loss(packed)) == 2.0

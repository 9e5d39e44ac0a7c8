"""Packed params remember the layout they were packed under, through every loader the docs show.

A checkpoint saved under one spec and loaded under another must be refused, never unpacked into
a silently different model. The cases are the ones users hit: other members, another canonical
member, a view read as a plain tie (same shapes), other stacked slices.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tietransform as tt
from tests.helpers import Tower, tower_loss


def _params():
    # Square (2, 2) leaves, so that a transposing view fits the same shapes as a plain tie.
    params = {k: jnp.full((2, 2), float(i), jnp.float32) for i, k in enumerate("abc")}
    params["w"] = jnp.arange(4.0, dtype=jnp.float32)[:, None] * jnp.ones((4, 2), jnp.float32)
    return params


# (saved under, loaded under): each pair gives the same tree of array shapes.
CASES = {
    "other members": (tt.TieSpec(t=["a", "b"]), tt.TieSpec(t=["b", "c"])),
    "other canonical": (tt.TieSpec(t=["a", "b"]), tt.TieSpec(t=tt.group("a", "b", canonical="b"))),
    "view read as a plain tie": (
        tt.TieSpec(t=tt.view("a", "b", jnp.transpose)),
        tt.TieSpec(t=["a", "b"]),
    ),
    "other view function": (
        tt.TieSpec(t=tt.view("a", "b", jnp.transpose)),
        tt.TieSpec(t=tt.view("a", "b", jnp.negative)),
    ),
    "other stack slices": (
        tt.TieSpec(s=tt.stack("w", [0, 2])),
        tt.TieSpec(s=tt.stack("w", [0, 1])),
    ),
    "other groups": (tt.TieSpec(t=["a", "b"]), tt.TieSpec(u=["a", "b"])),
}
REFUSED = r"(packed under another layout|do not match the spec)"


def _read(spec):
    return tt.tie(lambda p: sum(jnp.sum(p[k]) for k in "abcw"), spec)


@pytest.mark.parametrize("case", CASES)
def test_eqx_deserialise_refuses_a_file_saved_under_another_layout(case, tmp_path):
    saved_under, loaded_under = CASES[case]
    eqx.tree_serialise_leaves(tmp_path / "p.eqx", tt.pack(_params(), saved_under))
    skeleton = tt.pack(_params(), loaded_under)
    # The message is Equinox's: the layout records' shapes differ between file and skeleton.
    with pytest.raises(RuntimeError, match="changed shape"):
        eqx.tree_deserialise_leaves(tmp_path / "p.eqx", skeleton)


@pytest.mark.parametrize("case", CASES)
def test_our_loader_names_the_groups_whose_layout_the_file_does_not_hold(case, tmp_path):
    saved_under, loaded_under = CASES[case]
    eqx.tree_serialise_leaves(tmp_path / "p.eqx", tt.pack(_params(), saved_under))
    skeleton = tt.pack(_params(), loaded_under)
    with pytest.raises(ValueError, match="was saved under another tie layout") as error:
        tt.tree_deserialise_leaves(tmp_path / "p.eqx", skeleton)
    message = str(error.value)
    (group,) = loaded_under.groups
    assert f"{group!r}" in message and "tt.pack(tt.unpack(params, saved_spec), spec)" in message


def test_our_loader_names_the_groups_when_the_file_object_starts_past_a_header(tmp_path):
    saved_under, loaded_under = CASES["other members"]
    with open(tmp_path / "p.eqx", "wb") as f:
        f.write(b"my header")
        eqx.tree_serialise_leaves(f, tt.pack(_params(), saved_under))
    with open(tmp_path / "p.eqx", "rb") as f:
        f.read(len(b"my header"))
        with pytest.raises(ValueError, match="was saved under another tie layout"):
            tt.tree_deserialise_leaves(f, tt.pack(_params(), loaded_under))


def test_our_loader_loads_a_file_into_a_skeleton_of_its_own_spec(tmp_path, getkey):
    spec = tt.TieSpec(ffn="tower.blocks[*].mlp", s=tt.stack("w"))
    params = {"tower": Tower(3, key=getkey()), "w": jnp.ones((3, 2), jnp.bfloat16)}
    packed = tt.pack(params, spec)
    with open(tmp_path / "p.eqx", "wb") as f:
        eqx.tree_serialise_leaves(f, packed)
    skeleton = eqx.filter_eval_shape(lambda: tt.pack(params, spec))
    with open(tmp_path / "p.eqx", "rb") as f:
        loaded = tt.tree_deserialise_leaves(f, skeleton)
    assert bool(eqx.tree_equal(loaded, packed))


def _fill_in_order(saved, skeleton):
    """A loader that fills the skeleton's leaves in order without comparing shapes (what
    `eqx.tree_deserialise_leaves` does before its own shape check, or a hand-written loader)."""
    return jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(saved))


@pytest.mark.parametrize("case", CASES)
def test_unpack_describe_and_tie_refuse_arrays_saved_under_another_layout(case):
    saved_under, loaded_under = CASES[case]
    loaded = _fill_in_order(tt.pack(_params(), saved_under), tt.pack(_params(), loaded_under))
    with pytest.raises(ValueError, match=REFUSED):
        tt.unpack(loaded, loaded_under)
    with pytest.raises(ValueError, match=REFUSED):
        tt.describe(loaded, loaded_under)
    with pytest.raises(ValueError, match=REFUSED):  # under jit: checked at trace time
        jax.jit(_read(loaded_under))(loaded)


@pytest.mark.parametrize("case", CASES)
def test_params_packed_under_one_spec_are_refused_under_another(case):
    saved_under, loaded_under = CASES[case]
    packed = tt.pack(_params(), saved_under)
    with pytest.raises(ValueError, match=REFUSED):
        tt.unpack(packed, loaded_under)
    with pytest.raises(ValueError, match=REFUSED):
        jax.jit(_read(loaded_under))(packed)


def test_the_refusal_names_both_layouts_and_how_to_convert():
    saved_under, loaded_under = CASES["view read as a plain tie"]
    with pytest.raises(ValueError, match="packed under another layout") as error:
        tt.unpack(tt.pack(_params(), saved_under), loaded_under)
    message = str(error.value)
    assert "view 't': b = transpose(a)" in message
    assert "tie group 't' of a, b (canonical a)" in message
    assert "tt.pack(tt.unpack(params, old_spec), new_spec)" in message


def test_converting_between_specs_as_the_message_says_keeps_the_saved_values():
    saved_under, loaded_under = CASES["other members"]
    packed = tt.pack(_params(), saved_under)
    converted = tt.pack(tt.unpack(packed, saved_under), loaded_under)
    full = tt.unpack(converted, loaded_under)
    np.testing.assert_array_equal(full["a"], np.zeros((2, 2)))  # saved: a = b = 0, c = 2
    np.testing.assert_array_equal(full["b"], np.zeros((2, 2)))
    np.testing.assert_array_equal(full["c"], np.zeros((2, 2)))  # now tied to b


def test_a_file_loads_into_a_skeleton_packed_under_its_own_spec(tmp_path, getkey):
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    packed = tt.pack(Tower(3, key=getkey()), spec)
    eqx.tree_serialise_leaves(tmp_path / "p.eqx", packed)
    skeleton = eqx.filter_eval_shape(lambda: tt.pack(Tower(3, key=jax.random.key(1)), spec))
    loaded = eqx.tree_deserialise_leaves(tmp_path / "p.eqx", skeleton)
    x = jax.random.normal(getkey(), (2, 8))
    loss = eqx.filter_jit(tt.tie(tower_loss, spec))
    assert float(loss(loaded, x)) == float(loss(packed, x))


def _record_shapes(tree):
    return [x.shape for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)) if not x.size]


def test_layout_records_survive_adamw_steps_and_gradients_keep_the_packed_structure(getkey):
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    packed = tt.pack(Tower(3, key=getkey()), spec)
    records = _record_shapes(packed)
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    params, static = eqx.partition(packed, eqx.is_array)
    state = optimizer.init(params)
    x = jax.random.normal(getkey(), (4, 8))

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: tt.tie(tower_loss, spec)(eqx.combine(p, static), x))(params)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        updates, state = optimizer.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    # optax mixes Python floats with int32 step counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(2):
            params, state = step(params, state)
    trained = eqx.combine(params, static)
    assert _record_shapes(trained) == records
    full = tt.unpack(trained, spec)
    assert full.blocks[2].mlp.layers[0].weight is full.blocks[0].mlp.layers[0].weight


# -- orbax ----------------------------------------------------------------------------------


def _saved(tree):
    """What orbax stores: the non-empty arrays (it refuses zero-size arrays, such as records)."""
    return eqx.filter(tree, lambda x: eqx.is_array(x) and x.size > 0)


@pytest.fixture
def checkpointer():
    ocp = pytest.importorskip("orbax.checkpoint")
    return ocp.StandardCheckpointer()


def test_orbax_restore_with_a_packed_target_round_trips(checkpointer, tmp_path, getkey):
    spec = tt.TieSpec(
        ffn="blocks[*].mlp",
        attn=tt.view("blocks[0].attn.weight", "blocks[2].attn.weight", jnp.transpose),
    )
    packed = tt.pack(Tower(3, key=getkey()), spec)
    checkpointer.save(tmp_path / "ckpt", _saved(packed))
    checkpointer.wait_until_finished()
    skeleton = tt.pack(Tower(3, key=jax.random.key(1)), spec)
    restored = eqx.combine(checkpointer.restore(tmp_path / "ckpt", _saved(skeleton)), skeleton)
    x = jax.random.normal(getkey(), (2, 8))
    loss = eqx.filter_jit(tt.tie(tower_loss, spec))
    assert float(loss(restored, x)) == float(loss(packed, x))


@pytest.mark.parametrize("case", CASES)
def test_orbax_refuses_a_packed_target_of_another_layout(case, checkpointer, tmp_path):
    saved_under, loaded_under = CASES[case]
    checkpointer.save(tmp_path / "ckpt", _saved(tt.pack(_params(), saved_under)))
    checkpointer.wait_until_finished()
    target = _saved(tt.pack(_params(), loaded_under))
    # orbax's message: the layout fingerprint is in the records' pytree keys.
    with pytest.raises(ValueError, match="[Ss]tructure"):
        checkpointer.restore(tmp_path / "ckpt", target)


@pytest.mark.parametrize("case", CASES)
def test_our_orbax_restore_names_the_groups_whose_layout_the_checkpoint_lacks(
    case, checkpointer, tmp_path
):
    saved_under, loaded_under = CASES[case]
    checkpointer.save(tmp_path / "ckpt", _saved(tt.pack(_params(), saved_under)))
    checkpointer.wait_until_finished()
    target = _saved(tt.pack(_params(), loaded_under))
    with pytest.raises(ValueError, match="was saved under another tie layout") as error:
        tt.orbax_restore(checkpointer, tmp_path / "ckpt", target)
    (group,) = loaded_under.groups
    assert f"{group!r}" in str(error.value)
    same = _saved(tt.pack(_params(), saved_under))
    restored = tt.orbax_restore(checkpointer, tmp_path / "ckpt", same)
    assert bool(eqx.tree_equal(restored, same))


def test_orbax_restore_without_a_target_is_refused_by_unpack_describe_and_tie(
    checkpointer, tmp_path
):
    spec = tt.TieSpec(t=["a", "b"], s=tt.stack("w", [0, 2]))
    checkpointer.save(tmp_path / "ckpt", _saved(tt.pack(_params(), spec)))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    _assert_refused_as_restored_without_target(restored, spec)


def _assert_refused_as_restored_without_target(restored, spec):
    with pytest.raises(ValueError, match="restored without a target"):
        tt.unpack(restored, spec)
    with pytest.raises(ValueError, match="restored without a target"):
        tt.describe(restored, spec)
    with pytest.raises(ValueError, match="restored without a target"):
        _read(spec)(restored)


def test_a_hand_built_target_less_restore_is_refused():
    # What orbax 0.12.8's `StandardCheckpointer().restore(path)` returned, without a target, for
    # `_saved(tt.pack(_params(), spec))` (printed and copied here, so this runs without orbax):
    # a plain dict; each TiedLeaf a dict of its record key (the record itself was not saved),
    # each StackedLeaf a dict of its data and record key.
    spec = tt.TieSpec(t=["a", "b"], s=tt.stack("w", [0, 2]))
    packed = tt.pack(_params(), spec)
    tied_key = jax.tree_util.tree_flatten_with_path(packed["b"])[0][0][0][0].name
    stacked_key = jax.tree_util.tree_flatten_with_path(packed["w"])[0][1][0][0].name
    restored = {
        "a": packed["a"],
        "b": {tied_key: None},
        "c": packed["c"],
        "w": {"data": packed["w"].data, stacked_key: None},
    }
    _assert_refused_as_restored_without_target(restored, spec)


def test_unpacking_an_unfilled_skeleton_names_the_shape_struct_by_its_short_type():
    spec = tt.TieSpec(g=["a", "b"])
    skeleton = eqx.filter_eval_shape(
        lambda: tt.pack({"a": jnp.ones((4, 3)), "b": jnp.ones((4, 3))}, spec)
    )
    with pytest.raises(ValueError, match=r"canonical leaf a .* holds ShapeDtypeStruct f32\[4,3\]"):
        tt.unpack(skeleton, spec)

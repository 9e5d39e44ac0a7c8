"""Placeholders are not arrays: using one as an array says to tie or unpack the model first."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Tower


NOT_AN_ARRAY = r"is a placeholder in packed params, not an array(.|\n)*tt\.tie(.|\n)*tt\.unpack"
SPEC = tt.TieSpec(ffn="blocks[*].mlp")


def test_calling_a_packed_equinox_model_says_to_tie_or_unpack_it(getkey):
    packed = tt.pack(Tower(2, key=getkey()), SPEC)
    x = jnp.ones(8)
    with pytest.raises(TypeError, match=NOT_AN_ARRAY):
        packed(x)
    with pytest.raises(TypeError, match=NOT_AN_ARRAY):
        packed.blocks[1].mlp.layers[0](x)  # an eqx.nn.Linear whose weight is tied
    with pytest.raises(TypeError, match=NOT_AN_ARRAY):
        eqx.filter_jit(lambda m, x: m(x))(packed, x)


@pytest.fixture(params=["TiedLeaf", "StackedLeaf"])
def placeholder(request):
    if request.param == "TiedLeaf":
        return tt.pack({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, tt.TieSpec(g=["a", "b"]))[
            "b"
        ]
    return tt.pack({"w": jnp.ones((3, 2))}, tt.TieSpec(s=tt.stack("w")))["w"]


@pytest.mark.parametrize(
    "use",
    [
        lambda p: jnp.ones(2) @ p,
        lambda p: p @ jnp.ones(2),
        lambda p: p + 1.0,
        lambda p: 2.0 * p,
        lambda p: -p,
        lambda p: p[0],
        lambda p: np.asarray(p),
        lambda p: jnp.asarray(p),
        lambda p: list(p),
    ],
    ids=["x @ p", "p @ x", "p + 1", "2 * p", "-p", "p[0]", "np.asarray", "jnp.asarray", "iter"],
)
def test_using_a_placeholder_as_an_array_raises_a_type_error_saying_what_to_do(placeholder, use):
    with pytest.raises(TypeError, match=NOT_AN_ARRAY):
        use(placeholder)


def test_array_attributes_of_a_placeholder_say_what_to_do(placeholder):
    with pytest.raises(AttributeError, match=NOT_AN_ARRAY):
        placeholder.T  # noqa: B018
    assert not hasattr(placeholder, "astype")


def test_a_placeholder_record_is_reachable_by_its_key(placeholder):
    (path, record), *_ = reversed(jax.tree_util.tree_flatten_with_path(placeholder)[0])
    assert path[-1].name.startswith("layout_") and record.size == 0
    assert getattr(placeholder, path[-1].name) is record


def test_a_stacked_leaf_key_path_names_its_data_field():
    packed = tt.pack({"w": jnp.ones((3, 2))}, tt.TieSpec(s=tt.stack("w")))
    (path, data), _ = jax.tree_util.tree_flatten_with_path(packed)[0]
    assert jax.tree_util.keystr(path) == "['w'].data"
    assert data is packed["w"].data


def test_a_stacked_leaf_repr_shows_its_full_type_groups_rows_and_data_on_one_line():
    packed = tt.pack({"w": jnp.ones((3, 2))}, tt.TieSpec(s=tt.stack("w")))
    assert (
        repr(packed["w"]) == "StackedLeaf(f32[3,2], groups=('s',), rows [0, 0, 0] of data f32[1,2])"
    )


def test_tied_leaves_of_one_layout_are_equal_and_hash_alike_whatever_their_records():
    spec = tt.TieSpec(g=["a", "b"])
    one, two = (tt.pack({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, spec)["b"] for _ in "12")
    assert one.record is not two.record
    assert one == two and hash(one) == hash(two)
    assert one != tt.pack({"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}, spec)["b"]


def test_constructor_arguments_are_normalised():
    leaf = tt.TiedLeaf("g", "a", [np.int64(2)], "float32", 0)
    assert (leaf.shape, leaf.dtype, leaf.weak_type) == ((2,), np.dtype(np.float32), False)
    stacked = tt.StackedLeaf(jnp.ones((1, 2)), [np.int32(0), 0], ["g"], 1)
    assert (stacked.rows, stacked.groups, stacked.weak_type) == ((0, 0), ("g",), True)


def test_placeholders_are_frozen(placeholder):
    with pytest.raises(dataclasses.FrozenInstanceError):
        placeholder.layout = None  # type: ignore[misc]


def _one_line_per_placeholder(text):
    lines = [line for line in text.splitlines() if "Leaf(" in line]
    return lines and all(line.rstrip(",").endswith(")") for line in lines)


def test_a_printed_packed_model_its_gradients_and_adam_state_show_each_tied_leaf_on_one_line(
    getkey,
):
    optax = pytest.importorskip("optax")
    packed = tt.pack(Tower(3, key=getkey()), SPEC)
    x = jnp.ones((2, 8))
    grads = eqx.filter_grad(tt.tie(lambda m, x: jnp.sum(jax.vmap(m)(x)), SPEC))(packed, x)
    state = optax.adam(1e-3).init(eqx.filter(packed, eqx.is_array))
    for tree in (packed, grads, state):
        text = eqx.tree_pformat(tree)
        assert _one_line_per_placeholder(text), text
        assert "layout" not in text and "record" not in text  # no member lists, no record shapes
    line = next(s for s in eqx.tree_pformat(packed).splitlines() if "TiedLeaf" in s)
    assert line.strip() == (
        "weight=TiedLeaf(f32[16,8], group='ffn', reads blocks[0].mlp.layers[0].weight),"
    )


def test_resizing_a_tied_buffer_in_packed_params_names_the_unpack_edit_repack_route():
    spec = tt.TieSpec(g=["a", "b"], v=tt.view("a", "c", jnp.transpose))
    packed = tt.pack({"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2)), "c": jnp.ones((2, 3))}, spec)
    resized = {**packed, "a": jnp.ones((5, 2))}
    with pytest.raises(ValueError, match="do not match the spec") as error:
        tt.unpack(resized, spec)
    assert "tt.unpack(packed, spec)`, edit `full` (every member), then `tt.pack" in str(error.value)

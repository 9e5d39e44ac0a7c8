"""Paths and patterns: every path the library prints reads back as a pattern that selects exactly
that node, for any key; quotes make a key literal; indices and slices follow Python."""

import collections
import enum

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tietransform._paths import format_path, matches, parse_pattern, where_source, writable


class Leaf:
    """A leaf with an identity of its own, so a selected node can be checked by `is`."""

    def __repr__(self) -> str:
        return "Leaf()"


Pair = collections.namedtuple("Pair", ["first", "second"])  # keys are GetAttrKeys

ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\t",
        "\\",
        "\n",
        "'",
        '"',
        "'\"",
        "[",
        "]",
        "[0]",
        "*",
        "**",
        "?",
        ".",
        "a.b",
        "é",
        "日本",
        "\x00",
        "\u2028",
        "True",
        "None",
        "1",
    ]
)
KEY_LISTS = st.one_of(
    st.lists(st.one_of(st.text(max_size=3), ODD_TEXT), min_size=1, max_size=3, unique=True),
    st.lists(st.integers(-3, 3), min_size=1, max_size=3, unique=True),
    st.lists(st.tuples(st.integers(0, 2), ODD_TEXT), min_size=1, max_size=3, unique=True),
    st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=2, unique=True),
    st.lists(st.booleans(), min_size=1, max_size=2, unique=True),
    st.just([None]),
    st.just([b"x", b"\xff"]),
)


@st.composite
def dicts(draw, children):
    keys = draw(KEY_LISTS)
    return {key: draw(children) for key in keys}


TREES = st.recursive(
    st.builds(Leaf),
    lambda children: st.one_of(
        dicts(children),
        st.lists(children, min_size=1, max_size=3),
        st.builds(Pair, children, children),
    ),
    max_leaves=10,
)


def node_paths(tree):
    """Every node's key path (leaves and subtrees), and the node itself."""
    out = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        for depth in range(1, len(path) + 1):
            out.setdefault(tuple(path[:depth]), None)
    return list(out)


def node_at(tree, path):
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            tree = getattr(tree, key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            tree = tree[key.key]
        else:
            tree = tree[key.idx]
    return tree


@hypothesis.given(TREES)
def test_every_printed_path_reads_back_as_a_pattern_selecting_exactly_its_node(tree):
    paths = node_paths(tree)
    for path in paths:
        if all(writable(key) for key in path):
            parsed = parse_pattern(format_path(path))
            assert [p for p in paths if matches(parsed, p)] == [path], format_path(path)


@hypothesis.given(TREES)
def test_every_printed_where_function_selects_its_node(tree):
    for path in node_paths(tree):
        where = eval(where_source(path))  # noqa: S307
        assert where(tree) is node_at(tree, path), where_source(path)


class Colour(enum.Enum):
    RED = 1


def test_keys_that_no_pattern_spells_are_named_with_a_where_function_in_the_error():
    params = {"a": {Colour.RED: jnp.zeros(2)}, "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="matches nothing in the model") as error:
        tt.pack(params, tt.TieSpec(g=["a.RED", "b"]))
    where = "lambda m: next(v for k, v in m['a'].items() if repr(k) == '<Colour.RED: 1>')"
    assert where in str(error.value)
    assert tt.pack(params, tt.TieSpec(g=[eval(where), "b"]))["b"] is not None  # noqa: S307


ODD_KEYS = ["", "tab\t", "back\\slash", "new\nline", "it's", 'say "hi"', "a[0]", "*", "é日本"]


LAST = "\U0010ffff"  # sorts after every other key, so the odd key is always the canonical member


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_the_source_path_a_tied_leaf_prints_ties_the_same_leaves_when_written_back(key):
    params = {key: jnp.zeros(2), LAST: jnp.zeros(2), "other": jnp.ones(2)}
    packed = tt.pack(params, tt.TieSpec(g=lambda p: [p[key], p[LAST]]))
    printed = packed[LAST].source
    again = tt.pack(params, tt.TieSpec(g=[printed, lambda p: p[LAST]]))
    assert again[LAST].source == printed
    assert eqx.is_array(again["other"]) and eqx.is_array(again[key])


def test_a_quoted_key_is_literal_not_a_glob():
    z, o = jnp.zeros(2), jnp.ones(2)
    packed = tt.pack({"a[0]": z, "a0": o, "b": z}, tt.TieSpec(g=["['a[0]']", "b"]))
    assert eqx.is_array(packed["a0"])
    assert packed["b"].source == "['a[0]']"


def test_a_quoted_star_is_the_literal_key_star():
    z, o = jnp.zeros(2), jnp.ones(2)
    packed = tt.pack({"*": z, "x": z, "y": o}, tt.TieSpec(g=["['*']", "x"]))
    assert eqx.is_array(packed["y"])


def test_an_empty_string_key_is_selected_by_its_printed_path():
    packed = tt.pack({"": jnp.zeros(2), "x": jnp.zeros(2)}, tt.TieSpec(g=["['']", "x"]))
    assert packed["x"].source == "['']"


def test_a_negative_index_counts_from_the_end_of_the_list():
    z = jnp.zeros(2)
    packed = tt.pack({"l": [z, z, z, None]}, tt.TieSpec(g=["l[0]", "l[-2]"]))
    assert isinstance(packed["l"][2], tt.TiedLeaf)
    assert eqx.is_array(packed["l"][1])


def test_a_negative_index_counts_a_trailing_module_without_fields_as_an_element():
    z, identity = jnp.zeros(2), eqx.nn.Identity()  # no leaves, but the list's last element
    params = {"l": [z, jnp.ones(2), identity], "x": jnp.full(2, 5.0, jnp.float32)}
    with pytest.raises(ValueError, match=r"matches only l\[2\], which holds no leaves"):
        tt.pack(params, tt.TieSpec(g=tt.group("x", "l[-1]", canonical="x")))
    packed = tt.pack(params, tt.TieSpec(g=tt.group("x", "l[-2]", canonical="x")))
    assert packed["l"][1].source == "x"


def test_a_slice_selects_the_list_elements_python_would():
    z = jnp.zeros(2)
    packed = tt.pack({"l": [z, z, z, z, z]}, tt.TieSpec(g="l[1::2]"))
    tied = [i for i, x in enumerate(packed["l"]) if isinstance(x, tt.TiedLeaf)]
    assert tied == [3]  # members l[1] and l[3]; l[1] is canonical


def test_an_int_index_does_not_select_a_bool_dict_key():
    assert not matches(parse_pattern("[1]"), (jax.tree_util.DictKey(True),))
    assert matches(parse_pattern("[True]"), (jax.tree_util.DictKey(True),))


def test_a_bare_bracket_that_is_not_an_index_says_it_is_not_a_character_class():
    params = {"layer": jnp.zeros(2), "lazer": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"Malformed path pattern 'la\[yz\]er\*': \[yz\] is"):
        tt.pack(params, tt.TieSpec(g="la[yz]er*"))


def test_stack_slices_may_be_numpy_integers():
    spec = tt.TieSpec(s=tt.stack("w", np.arange(2), canonical=np.int64(1)))
    packed = tt.pack({"w": jnp.arange(6.0).reshape(3, 2)}, spec)
    np.testing.assert_array_equal(packed["w"].data, [[2.0, 3.0], [4.0, 5.0]])


def test_a_bool_canonical_is_refused_as_not_a_position():
    with pytest.raises(TypeError, match="tt.group: `canonical` must be a member's path or its"):
        tt.group("a", "b", canonical=True)


def test_a_stack_over_an_axis_of_length_zero_is_refused_naming_the_array():
    with pytest.raises(ValueError, match=r"tt.stack group 's' selects w \(f32\[0,2\]\), whose"):
        tt.pack({"w": jnp.zeros((0, 2))}, tt.TieSpec(s=tt.stack("w")))


class Holder(eqx.Module):
    w: jax.Array
    v: jax.Array
    none: None
    empty: tuple


def holder():
    return Holder(jnp.zeros(2), jnp.zeros(2), None, ())


def test_a_where_function_returning_none_is_refused():
    with pytest.raises(ValueError, match="The `where` function of tie group 'g' returned None"):
        tt.pack(holder(), tt.TieSpec(g=lambda m: [m.w, m.none]))


def test_a_where_function_returning_an_empty_tuple_is_refused():
    with pytest.raises(ValueError, match="The `where` function of tie group 'g' returned an emp"):
        tt.pack(holder(), tt.TieSpec(g=lambda m: m.empty))


def test_a_pattern_that_indexes_into_an_array_points_to_tt_stack():
    with pytest.raises(
        ValueError, match=r"Pattern 'w\[1:\]' of tie group 'g' matches nothing"
    ) as e:
        tt.pack({"w": jnp.zeros((4, 2))}, tt.TieSpec(g="w[1:]"))
    assert "w is an array" in str(e.value) and "tt.stack('w', slices=[...])" in str(e.value)


def test_an_index_past_the_end_of_a_list_says_how_long_the_list_is():
    z = jnp.zeros(2)
    with pytest.raises(
        ValueError, match=r"Pattern 'l\[-3\]' of tie group 'g' matches nothing"
    ) as e:
        tt.pack({"l": [z, z], "a": z}, tt.TieSpec(g=["l[-3]", "a"]))
    assert "l has 2 elements, so [-3] is out of range." in str(e.value)


def test_a_where_function_returning_a_generator_is_told_to_return_a_list():
    with pytest.raises(ValueError, match="The `where` function of tie group 'g' returned a gen"):
        tt.pack(holder(), tt.TieSpec(g=lambda m: (x for x in (m.w, m.v))))

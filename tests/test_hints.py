"""Hints in declaration errors look at the model: every declaration they suggest selects nodes of
it, and a one-member group whose arrays share a leading axis is pointed to `tt.stack`."""

import re

import jax
import jax.numpy as jnp
import pytest

import tietransform as tt
from tests.helpers import Tower
from tietransform._paths import matches, parse_pattern


def stacked_model():
    """A scan-over-layers model: 4 layers stacked along the leading axis of each array."""
    key = jax.random.key(0)
    return {
        "embed": jax.random.normal(key, (10, 8)),
        "blocks": {
            "attn": jax.random.normal(key, (4, 8, 8)),
            "mlp": {
                "w1": jax.random.normal(key, (4, 8, 16)),
                "w2": jax.random.normal(key, (4, 16, 8)),
            },
        },
    }


def list_model():
    return Tower(3, key=jax.random.key(0))


def uneven_model():
    """Two arrays of one structure but different lengths: no plain tie can hold both."""
    return {"a": {"w": jnp.ones((3, 2))}, "b": {"w": jnp.ones((5, 2))}, "c": jnp.ones((5, 2))}


CASES = {
    "stacked, one member": (stacked_model, "blocks.mlp"),
    "stacked, list pattern": (stacked_model, "blocks[*].mlp"),
    "list, one member": (list_model, "blocks[0].mlp"),
    "list, misspelt": (list_model, "blocks[*].mpl"),
    "list, one leaf": (list_model, "blocks[1].mlp.layers[0].weight"),
    "uneven, one member": (uneven_model, "a.w"),
}


def error_of(make):
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


def suggested_specs(message):
    """Every `TieSpec(...)` the message suggests, evaluated."""
    found = re.findall(r"TieSpec\(\w+=(?:tt\.stack\('[^']*'\)|'[^']*'|\[[^\]]*\])\)", message)
    return [eval(text, {"TieSpec": tt.TieSpec, "tt": tt}) for text in found]  # noqa: S307


def named_patterns(message, pattern):
    """Every quoted path or pattern in the message but the user's own (and the group's name)."""
    nearest = re.search(r"Nearest paths: (.*?)\. ", message)
    listed = nearest.group(1).split(", ") if nearest else []
    return (set(re.findall(r"'([^']*)'", message)) | set(listed)) - {pattern, "ffn"}


def is_node(model, pattern):
    keypaths = [
        tuple(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(
            model, is_leaf=lambda x: isinstance(x, tt.TiedLeaf)
        )[0]
    ]
    parsed = parse_pattern(pattern)
    return any(matches(parsed, k[:depth]) for k in keypaths for depth in range(len(k) + 1))


def test_a_one_member_group_on_a_stacked_model_suggests_tt_stack_and_no_list_pattern():
    message = error_of(lambda: tt.pack(stacked_model(), tt.TieSpec(ffn="blocks.mlp")))
    assert "TieSpec(ffn=tt.stack('blocks.mlp'))" in message
    assert "[*]" not in message


def test_a_one_member_group_in_a_list_suggests_the_pattern_over_the_list():
    message = error_of(lambda: tt.pack(list_model(), tt.TieSpec(ffn="blocks[0].mlp")))
    assert "TieSpec(ffn='blocks[*].mlp') selects it and 2 more node(s)" in message


def test_a_list_pattern_on_a_stacked_model_points_to_the_stacked_node():
    tied = tt.tie(lambda m: 0.0, tt.TieSpec(ffn="blocks[*].mlp"))
    message = error_of(lambda: tied(stacked_model()))
    assert "blocks.mlp holds stacked layers `(L, ...)`: tie them with tt.stack('blocks.mlp')" in (
        message
    )


@pytest.mark.parametrize("case", CASES)
def test_every_declaration_a_hint_suggests_selects_nodes_of_the_model(case):
    make_model, pattern = CASES[case]
    model = make_model()
    message = error_of(lambda: tt.pack(model, tt.TieSpec(ffn=pattern)))
    for spec in suggested_specs(message):
        try:
            tt.pack(model, spec)
        except ValueError as error:  # without shapes a hint may not know the members differ
            assert not re.search("matches nothing|only one member", str(error)), (spec, error)
    for path in named_patterns(message, pattern):
        assert is_node(model, path), (path, message)


@pytest.mark.parametrize("case", CASES)
def test_with_the_arrays_known_every_suggested_declaration_packs(case):
    make_model, pattern = CASES[case]
    model = make_model()
    # `tie` resolves its spec against the arrays it is given (before anything else), so its
    # hints see their shapes.
    message = error_of(lambda: tt.tie(lambda m: 0.0, tt.TieSpec(ffn=pattern))(model))
    for spec in suggested_specs(message):
        tt.pack(model, spec)
    for path in named_patterns(message, pattern):
        assert is_node(model, path), (path, message)

"""Declaring tie groups: what each form selects, and the errors bad declarations raise."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Tower, assert_trees_close
from tietransform._resolve import flatten, plan_for
from tietransform.testing import check_tied


@pytest.fixture
def tower(getkey):
    return Tower(4, key=getkey())


def members_of(spec, params, name):
    packed = tt.pack(params, spec)
    paths = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            packed, is_leaf=lambda x: isinstance(x, tt.TiedLeaf)
        )
        if isinstance(leaf, tt.TiedLeaf) and leaf.group == name
    ]
    return paths


def test_subtree_pattern_ties_every_array_leaf_member_by_member(tower):
    tied = members_of(tt.TieSpec(ffn="blocks[*].mlp"), tower, "ffn")
    # 3 non-canonical members x (2 weights + 2 biases)
    assert len(tied) == 12
    assert all(".blocks[0]" not in p for p in tied)


def test_bracket_and_dot_star_patterns_are_the_same(tower):
    a = members_of(tt.TieSpec(w="blocks[*].mlp.layers[0].weight"), tower, "w")
    b = members_of(tt.TieSpec(w="blocks.*.mlp.layers.0.weight"), tower, "w")
    assert a == b and len(a) == 3


def test_double_star_matches_any_depth():
    params = {"a": {"x": {"w": jnp.ones(2)}}, "b": {"w": jnp.ones(2)}}
    assert members_of(tt.TieSpec(g="**.w"), params, "g") == ["['b']['w']"]


def test_where_lambda_selects_the_same_members_as_the_pattern(tower):
    by_pattern = members_of(tt.TieSpec(ffn="blocks[*].mlp"), tower, "ffn")
    by_where = members_of(tt.TieSpec(ffn=lambda m: [b.mlp for b in m.blocks]), tower, "ffn")
    assert by_where == by_pattern


def test_canonical_member_can_be_chosen_by_path_or_position(tower):
    spec = tt.TieSpec(ffn=tt.group("blocks[*].mlp", canonical="blocks[2].mlp"))
    packed = tt.pack(tower, spec)
    assert isinstance(packed.blocks[0].mlp.layers[0].weight, tt.TiedLeaf)
    assert packed.blocks[0].mlp.layers[0].weight.source == "blocks[2].mlp.layers[0].weight"
    np.testing.assert_array_equal(
        packed.blocks[2].mlp.layers[0].weight, tower.blocks[2].mlp.layers[0].weight
    )
    by_position = tt.pack(tower, tt.TieSpec(ffn=tt.group("blocks[*].mlp", canonical=-1)))
    assert by_position.blocks[0].mlp.layers[0].weight.source == "blocks[3].mlp.layers[0].weight"


def test_non_array_leaves_inside_tied_subtrees_are_left_alone(tower):
    packed = tt.pack(tower, tt.TieSpec(ffn="blocks[*].mlp"))
    assert packed.blocks[1].mlp.activation is tower.blocks[1].mlp.activation


def test_pattern_that_matches_nothing_suggests_near_paths(tower):
    with pytest.raises(ValueError, match=r"matches nothing.*Nearest paths: blocks\[\*\]\.mlp,"):
        tt.pack(tower, tt.TieSpec(ffn="blocks[*].mpl"))


def test_single_member_group_is_refused(tower):
    with pytest.raises(ValueError, match="selects only one member"):
        tt.pack(tower, tt.TieSpec(ffn="blocks[0].mlp"))


def test_overlapping_groups_are_refused(tower):
    spec = tt.TieSpec(
        ffn="blocks[*].mlp", first=["blocks[0].mlp.layers[0]", "blocks[1].mlp.layers[0]"]
    )
    with pytest.raises(ValueError, match=r"Tie groups 'ffn' and 'first' overlap at blocks\[0\]"):
        tt.pack(tower, spec)


def test_nested_members_of_one_group_are_refused():
    params = {"a": {"w": jnp.ones(2), "a": {"w": jnp.ones(2)}}, "b": {"w": jnp.ones(2)}}
    with pytest.raises(ValueError, match="overlap"):
        tt.pack(params, tt.TieSpec(g=["a", "a.a"]))


def test_members_with_different_structure_are_refused():
    params = {"a": {"w": jnp.ones(2), "b": jnp.ones(2)}, "c": {"w": jnp.ones(2)}}
    with pytest.raises(ValueError, match="must have the same structure"):
        tt.pack(params, tt.TieSpec(g=["a", "c"]))


def test_members_with_different_shapes_are_refused_naming_both():
    params = {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}
    with pytest.raises(
        ValueError, match=r"must have the same shape and dtype(.|\n)*  a  f32\[3,2\]"
    ):
        tt.pack(params, tt.TieSpec(g=["a", "b"]))


def test_members_with_different_dtypes_are_refused():
    params = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"must have the same shape and dtype(.|\n)*bf16\[2\]"):
        tt.pack(params, tt.TieSpec(g=["a", "b"]))


def test_members_that_differ_only_in_weak_type_are_refused():
    params = {"a": jnp.asarray(1.0), "b": jnp.asarray(1.0, jnp.float32)}
    with pytest.raises(ValueError, match="differ only in weak type"):
        tt.pack(params, tt.TieSpec(g=["a", "b"]))


def test_non_array_members_are_refused():
    params = {"a": 1.0, "b": 2.0}
    with pytest.raises(ValueError, match="non-array leaves"):
        tt.pack(params, tt.TieSpec(g=["a", "b"]))


def test_view_whose_output_does_not_fit_is_refused():
    params = {"emb": jnp.ones((3, 4)), "head": jnp.ones((5, 4))}
    with pytest.raises(
        ValueError, match=r"must fit the output of its view(.|\n)*  head  f32\[5,4\]"
    ):
        tt.pack(params, tt.TieSpec(head=tt.view("emb", "head", jnp.transpose)))


def test_stack_slices_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"slices \[5\] are out of range for w,"):
        tt.pack({"w": jnp.ones((4, 2))}, tt.TieSpec(s=tt.stack("w", [0, 5])))


def test_stack_on_a_scalar_is_refused():
    with pytest.raises(ValueError, match="not a stacked array"):
        tt.pack({"w": jnp.ones(())}, tt.TieSpec(s=tt.stack("w", [0, 1])))


def test_stack_groups_sharing_a_slice_are_refused():
    spec = tt.TieSpec(a=tt.stack("w", [0, 1]), b=tt.stack("w", [1, 2]))
    with pytest.raises(ValueError, match=r"overlap at w\[1\]"):
        tt.pack({"w": jnp.ones((4, 2))}, spec)


def test_where_returning_a_non_node_is_refused(tower):
    with pytest.raises(ValueError, match="not a node of the model"):
        tt.pack(tower, tt.TieSpec(ffn=lambda m: [jnp.ones(3), jnp.ones(3)]))


def test_where_that_computes_is_refused_with_advice(tower):
    with pytest.raises(ValueError, match="must only select nodes"):
        tt.pack(tower, tt.TieSpec(ffn=lambda m: [b.mlp.layers[0].weight.T for b in m.blocks]))


@pytest.mark.parametrize("pattern", ["blocks[*", "", "blocks..mlp"])
def test_malformed_patterns_are_refused(tower, pattern):
    with pytest.raises(ValueError, match="Malformed path pattern|empty segment"):
        tt.pack(tower, tt.TieSpec(ffn=pattern))


def test_a_spec_without_groups_resolves_to_a_plan_that_ties_nothing(tower):
    plan = plan_for(tt.TieSpec(), flatten(tower))
    assert (plan.groups, plan.slots, plan.stacks) == ((), (), ())


def test_spec_needs_valid_declarations():
    with pytest.raises(TypeError, match="expected a path pattern"):
        tt.TieSpec(g=3)
    with pytest.raises(ValueError, match="at least two slices"):
        tt.stack("w", [0])


def test_stack_slices_and_canonical_must_be_int_indices():
    with pytest.raises(TypeError, match=r"`slices` must be ints, got \[True, False\]"):
        tt.stack("w", [True, False])
    with pytest.raises(TypeError, match="`canonical` must be an int slice index, got '1'"):
        tt.stack("w", canonical="1")  # type: ignore[arg-type]


def test_stack_canonical_out_of_range_is_refused_not_wrapped():
    spec = tt.TieSpec(s=tt.stack("w", canonical=7))
    with pytest.raises(ValueError, match="canonical slice 7 is out of range for w, whose leading"):
        tt.pack({"w": jnp.ones((4, 2))}, spec)


def test_stack_canonical_may_count_from_the_end_like_slices():
    w = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))
    packed = tt.pack({"w": w}, tt.TieSpec(s=tt.stack("w", [0, 1, 2, 3], canonical=-1)))
    np.testing.assert_array_equal(packed["w"].data, w[3:])


def test_a_canonical_pattern_matching_several_members_is_refused():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"canonical='\*' matches 2 members of tie group 'g'"):
        tt.pack(params, tt.TieSpec(g=tt.group("a", "b", canonical="*")))


def test_a_pattern_matching_only_a_none_node_says_it_holds_no_leaves():
    params = {"a": None, "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="matches only a, which holds no leaves"):
        tt.pack(params, tt.TieSpec(g=["a", "b"]))


def test_where_returning_a_node_and_a_node_inside_it_is_refused_as_an_overlap():
    params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}
    with pytest.raises(ValueError, match="returned a.w together with a node that contains it"):
        tt.pack(params, tt.TieSpec(g=lambda m: [m["a"], m["a"]["w"], m["b"]]))


def ffn_blocks(n, key):
    """A list of `n` unstacked blocks, each with an MLP of two `eqx.nn.Linear` (8 -> 16 -> 8)."""
    keys = jax.random.split(key, 2 * n)
    return {
        "blocks": [
            {
                "mlp": [
                    eqx.nn.Linear(8, 16, key=keys[2 * i]),
                    eqx.nn.Linear(16, 8, key=keys[2 * i + 1]),
                ]
            }
            for i in range(n)
        ]
    }


def ffn_blocks_loss(model, x):
    for block in model["blocks"]:
        up, down = block["mlp"]
        x = x + jax.vmap(down)(jax.nn.gelu(jax.vmap(up)(x)))
    return jnp.mean(x**2)


def test_a_stack_over_a_list_of_blocks_is_refused_naming_the_arrays_and_a_plain_group(getkey):
    model, x = ffn_blocks(3, getkey()), jax.random.normal(getkey(), (5, 8))
    spec = tt.TieSpec(ffn=tt.stack("blocks[*].mlp"))
    with pytest.raises(ValueError, match="do not share a leading axis") as error:
        tt.tie(ffn_blocks_loss, spec)(tt.pack(model, spec), x)
    message = str(error.value)
    assert "blocks[0].mlp[0].weight  f32[16,8]" in message
    assert "blocks[0].mlp[1].weight  f32[8,16]" in message
    assert "TieSpec(ffn='blocks[*].mlp')" in message


def test_pack_refuses_a_stack_over_a_list_of_blocks(getkey):
    with pytest.raises(ValueError, match="do not share a leading axis"):
        tt.pack(ffn_blocks(2, getkey()), tt.TieSpec(ffn=tt.stack("blocks[*].mlp")))


def test_the_plain_group_a_stack_error_points_to_ties_the_blocks(getkey):
    model, x = ffn_blocks(3, getkey()), jax.random.normal(getkey(), (5, 8))
    check_tied(ffn_blocks_loss, tt.TieSpec(ffn="blocks[*].mlp"), model, x)


def test_separate_stacked_arrays_of_different_lengths_may_share_one_selector(getkey):
    params = {
        "a": {"w": jax.random.normal(getkey(), (3, 2))},
        "b": {"w": jax.random.normal(getkey(), (5, 2))},
    }
    spec = tt.TieSpec(rows=tt.stack("*.w"))

    def scan_rows(p, v):
        def step(total, row):
            return total + jnp.sin(row @ v), None

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.scan(step, zero, p["a"]["w"])[0] + jax.lax.scan(step, zero, p["b"]["w"])[0]

    check_tied(scan_rows, spec, params, jnp.ones(2))


class LanguageModel(eqx.Module):
    """An embedding and an output head, as Equinox stores them: both weights are (vocab, dim)."""

    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, vocab: int, dim: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1)
        self.head = eqx.nn.Linear(dim, vocab, use_bias=False, key=k2)

    def __call__(self, token: jax.Array) -> jax.Array:
        return self.head(self.embed(token))


def test_a_transposing_view_onto_a_member_of_the_source_shape_names_the_plain_group(getkey):
    model = LanguageModel(10, 4, key=getkey())
    spec = tt.TieSpec(head=tt.view("embed.weight", "head.weight", jnp.transpose))
    with pytest.raises(ValueError, match="View 'head' changes the shape of embed.weight") as error:
        tt.pack(model, spec)
    assert "TieSpec(head=['embed.weight', 'head.weight'])" in str(error.value)
    assert "Equinox stores `Linear(in, out).weight` as (out, in)" in str(error.value)


def test_a_square_equinox_embedding_transposed_onto_a_linear_head_is_warned_about(getkey):
    model = LanguageModel(4, 4, key=getkey())
    spec = tt.TieSpec(head=tt.view("embed.weight", "head.weight", jnp.transpose))
    with pytest.warns(UserWarning, match="View 'head' transposes embed.weight, an eqx.nn.Embed"):
        tt.pack(model, spec)


def test_a_square_transposed_tie_between_two_linears_is_not_warned_about(getkey):
    k1, k2 = jax.random.split(getkey())
    autoencoder = {"encode": eqx.nn.Linear(4, 4, key=k1), "decode": eqx.nn.Linear(4, 4, key=k2)}
    spec = tt.TieSpec(w=tt.view("encode.weight", "decode.weight", jnp.transpose))
    packed = tt.pack(autoencoder, spec)  # filterwarnings = error: a warning would fail here
    full = tt.unpack(packed, spec)
    np.testing.assert_array_equal(full["decode"].weight, full["encode"].weight.T)


def test_an_equinox_head_tied_by_a_plain_group_computes_the_hand_tied_logits(getkey):
    model = LanguageModel(4, 4, key=getkey())  # square: a wrong orientation would go unnoticed
    spec = tt.TieSpec(head=["embed.weight", "head.weight"])
    token = jnp.asarray(2)
    logits = tt.tie(lambda m, t: m(t), spec)(tt.pack(model, spec), token)
    embedding = model.embed.weight
    # float32 dot products of 4 terms, rounded in a different order than the hand-tied one.
    assert_trees_close(logits, embedding @ embedding[token], summands=4)


def test_a_structure_mismatch_names_the_differing_leaves_as_paths_below_each_member():
    params = {"a": {"w": [jnp.ones(2)], "my key": jnp.ones(2)}, "c": {"w": [jnp.ones(2)]}}
    with pytest.raises(ValueError, match="must have the same structure") as error:
        tt.pack(params, tt.TieSpec(g=["a", "c"]))
    assert "a and c differ: a alone has ['my key']." in str(error.value)


def test_a_square_flax_embedding_tied_to_a_kernel_by_a_plain_group_is_warned_about(getkey):
    embedding = jax.random.normal(getkey(), (4, 4))
    params = {"embed": {"embedding": embedding}, "head": {"kernel": embedding + 1}}
    spec = tt.TieSpec(head=["embed.embedding", "head.kernel"])
    with pytest.warns(UserWarning, match="Tie group 'head' ties head.kernel .a Flax kernel"):
        tt.pack(params, spec)


def test_a_square_flax_head_tied_by_a_transposing_view_is_not_warned_about(getkey):
    params = {"embed": {"embedding": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 4))}}
    spec = tt.TieSpec(head=tt.view("embed.embedding", "head.kernel", jnp.transpose))
    tt.pack(params, spec)  # filterwarnings = error: a warning would fail here


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: tt.Group(("a", "b"), init="mean"), ValueError, "`init` must be one of"),
        (lambda: tt.Group(("a", "b"), canonical=True), TypeError, "`canonical` must be"),
        (lambda: tt.Stack("w", None, canonical=1.5), TypeError, "`canonical` must be an int"),
        (lambda: tt.stack("w", init="lower"), ValueError, "`init` must be one of"),
    ],
    ids=["Group init", "Group canonical bool", "Stack canonical float", "stack init"],
)
def test_declarations_built_directly_are_checked_as_their_constructors_check_them(
    build, error, match
):
    with pytest.raises(error, match=match):
        build()

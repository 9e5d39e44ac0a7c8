"""pack / unpack / describe: one buffer per tied leaf, and the full model back."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Tower


@pytest.fixture
def tower(getkey):
    return Tower(4, key=getkey())


SPEC = tt.TieSpec(ffn="blocks[*].mlp")


def test_packed_model_keeps_its_type_and_one_array_per_buffer(tower):
    packed = tt.pack(tower, SPEC)
    assert type(packed) is Tower and type(packed.blocks[1].mlp) is eqx.nn.MLP
    full_arrays = jax.tree.leaves(eqx.filter(tower, eqx.is_array))
    packed_arrays = jax.tree.leaves(eqx.filter(packed, eqx.is_array))
    assert len(full_arrays) == 4 * 2 + 4 * 4
    buffers = [x for x in packed_arrays if x.size]
    records = [x for x in packed_arrays if not x.size]
    assert len(buffers) == 4 * 2 + 4  # attn per block, one MLP
    assert len(records) == 1  # one zero-size layout record per tie group


def test_unpack_of_pack_is_the_model_with_every_member_set_to_its_canonical_value(tower):
    full = tt.unpack(tt.pack(tower, SPEC), SPEC)
    for block, original in zip(full.blocks, tower.blocks, strict=True):
        np.testing.assert_array_equal(block.attn.weight, original.attn.weight)
        for got, want in zip(
            jax.tree.leaves(block.mlp), jax.tree.leaves(tower.blocks[0].mlp), strict=True
        ):
            if eqx.is_array(got):
                np.testing.assert_array_equal(got, want)


def test_unpack_gives_members_of_a_plain_tie_the_same_array(tower):
    full = tt.unpack(tt.pack(tower, SPEC), SPEC)
    assert full.blocks[3].mlp.layers[0].weight is full.blocks[0].mlp.layers[0].weight


def test_view_members_are_rebuilt_through_the_view():
    spec = tt.TieSpec(head=tt.view("emb", "head", jnp.transpose))
    emb = jnp.arange(6.0).reshape(2, 3)
    full = tt.unpack(tt.pack({"emb": emb, "head": jnp.zeros((3, 2))}, spec), spec)
    np.testing.assert_array_equal(full["head"], emb.T)


def test_stacked_ties_store_only_distinct_slices_and_unpack_whole():
    w = jnp.arange(5 * 2.0).reshape(5, 2)
    spec = tt.TieSpec(s=tt.stack("w", [1, 3, 4]))
    packed = tt.pack({"w": w}, spec)
    assert isinstance(packed["w"], tt.StackedLeaf) and packed["w"].data.shape == (3, 2)
    full = tt.unpack(packed, spec)["w"]
    np.testing.assert_array_equal(full, w[np.array([0, 1, 2, 1, 1])])


def test_negative_stack_slices_count_from_the_end():
    w = jnp.arange(4 * 2.0).reshape(4, 2)
    spec = tt.TieSpec(s=tt.stack("w", [-1, 0], canonical=-1))
    full = tt.unpack(tt.pack({"w": w}, spec), spec)["w"]
    np.testing.assert_array_equal(full, w[np.array([3, 1, 2, 3])])


def test_packing_a_rebuilt_model_gives_an_equal_treedef(getkey):
    a = tt.pack(Tower(3, key=getkey()), SPEC)
    b = tt.pack(Tower(3, key=getkey()), SPEC)
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_pack_copies_buffers_so_the_model_survives_donation(tower):
    packed = tt.pack(tower, SPEC)
    assert packed.blocks[0].attn.weight is not tower.blocks[0].attn.weight
    shared = tt.pack(tower, SPEC, copy=False)
    assert shared.blocks[0].attn.weight is tower.blocks[0].attn.weight


def test_require_equal_refuses_members_with_different_values(tower):
    with pytest.raises(ValueError, match=r"hold different values: blocks\[1\]\.mlp"):
        tt.pack(tower, SPEC, require_equal=True)


def test_require_equal_accepts_a_model_that_is_already_tied(tower):
    retied = tt.unpack(tt.pack(tower, SPEC), SPEC)
    tt.pack(retied, SPEC, require_equal=True)


def test_require_equal_checks_views_and_stacks():
    spec = tt.TieSpec(head=tt.view("emb", "head", jnp.transpose), s=tt.stack("w", [0, 1]))
    good = {"emb": jnp.ones((2, 3)), "head": jnp.ones((3, 2)), "w": jnp.ones((3, 2))}
    tt.pack(good, spec, require_equal=True)
    with pytest.raises(ValueError, match="through its view"):
        tt.pack({**good, "head": jnp.zeros((3, 2))}, spec, require_equal=True)
    with pytest.raises(ValueError, match="slice 1 differs from slice 0"):
        tt.pack({**good, "w": jnp.arange(6.0).reshape(3, 2)}, spec, require_equal=True)


def test_packing_packed_params_is_refused(tower):
    with pytest.raises(ValueError, match="already packed"):
        tt.pack(tt.pack(tower, SPEC), SPEC)


def test_unpack_refuses_params_packed_with_another_spec(tower):
    packed = tt.pack(tower, tt.TieSpec(ffn="blocks[*].mlp.layers[0]"))
    with pytest.raises(
        ValueError, match=r"packed params do not match the spec: blocks\[1\]\.mlp\.layers\[1\]"
    ):
        tt.unpack(packed, SPEC)


def test_unpack_refuses_a_canonical_leaf_whose_shape_changed(tower):
    packed = tt.pack(tower, SPEC)
    broken = eqx.tree_at(lambda m: m.blocks[0].mlp.layers[0].weight, packed, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"is f32\[2,2\] but was packed as f32\[16,8\]"):
        tt.unpack(broken, SPEC)


def test_unpack_refuses_placeholders_no_group_covers():
    packed = {
        "a": jnp.ones(2),
        "b": tt.TiedLeaf("g", "a", (2,), jnp.float32, False),
        "c": jnp.ones(2),
    }
    packed["d"] = tt.TiedLeaf("x", "c", (2,), jnp.float32, False)
    with pytest.raises(ValueError, match="no tie group of this spec covers it"):
        tt.unpack(packed, tt.TieSpec(x=["c", "d"]))


def test_describe_lists_groups_members_and_bytes_saved(tower):
    text = tt.describe(tt.pack(tower, SPEC), SPEC)
    mlp_bytes = (8 * 16 + 16 + 16 * 8 + 8) * 4
    assert "ffn" in text and "blocks[0].mlp" in text
    mlp_numbers = mlp_bytes // 4  # float32
    assert f"saved {3 * mlp_numbers:,} ({3 * mlp_bytes / 1024:.1f} KiB)" in text


def test_describe_accepts_the_full_model_too(tower):
    assert tt.describe(tower, SPEC) == tt.describe(tt.pack(tower, SPEC), SPEC)


def test_pack_works_on_plain_containers_and_keeps_non_array_leaves():
    params = {
        "layers": [{"w": jnp.ones(2), "name": "first"}, {"w": jnp.ones(2), "name": "second"}],
        "step": 3,
    }
    packed = tt.pack(params, tt.TieSpec(w="layers[*].w"))
    assert packed["step"] == 3 and packed["layers"][1]["name"] == "second"
    assert isinstance(packed["layers"][1]["w"], tt.TiedLeaf)


def test_stack_without_slices_ties_every_slice_to_the_first():
    w = jnp.arange(4 * 2.0).reshape(4, 2)
    spec = tt.TieSpec(s=tt.stack("w"))
    packed = tt.pack({"w": w}, spec)
    assert packed["w"].data.shape == (1, 2)
    np.testing.assert_array_equal(tt.unpack(packed, spec)["w"], jnp.broadcast_to(w[0], (4, 2)))
    assert "saved 6 (24 B)" in tt.describe(packed, spec)  # 3 slices of 2 float32


def test_describe_counts_the_tied_slices_of_a_stack_and_names_the_kept_one():
    spec = tt.TieSpec(s=tt.stack("w", [0, 2, -1], canonical=2))
    text = tt.describe({"w": jnp.ones((4, 2))}, spec)
    header, row = text.splitlines()[:2]
    assert header.split() == ["group", "kind", "members", "leaves/member", "canonical", "saved"]
    # "slice 2 of w", not "w[2]": a stacked subtree's own paths hold indices (`mlp.layers[0]`).
    assert row.split() == ["s", "stack", "3", "slices", "1", "slice", "2", "of", "w", "16", "B"]
    assert "s: slices [0, 2, 3] of w" in text


def test_describe_lists_each_stack_when_they_tie_different_slice_counts():
    params = {"a": {"w": jnp.ones((4, 2))}, "b": {"w": jnp.ones((6, 2))}}
    text = tt.describe(params, tt.TieSpec(s=tt.stack("*.w")))
    assert text.splitlines()[1].split()[2:4] == ["4-6", "slices"]
    assert "s: slices 0-3 of a.w, 0-5 of b.w" in text
    assert "saved 16 (64 B)" in text  # (3 + 5) slices of 2 float32


def test_describe_of_a_spec_without_groups_says_nothing_is_tied():
    params = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
    assert tt.describe(params, tt.TieSpec()) == (
        "no tie groups: nothing is tied (parameters: 10 (40 B))"
    )


def test_pack_under_a_spec_without_groups_changes_nothing(tower):
    packed = tt.pack(tower, tt.TieSpec())
    assert bool(eqx.tree_equal(packed, tower))
    assert jax.tree.structure(packed) == jax.tree.structure(tower)
    assert bool(eqx.tree_equal(tt.unpack(packed, tt.TieSpec()), tower))


def test_stack_without_slices_accepts_a_single_slice():
    spec = tt.TieSpec(s=tt.stack("w"))
    packed = tt.pack({"w": jnp.ones((1, 3))}, spec)
    np.testing.assert_array_equal(tt.unpack(packed, spec)["w"], jnp.ones((1, 3)))


@pytest.mark.parametrize(
    "other",
    [tt.stack("w", [0, 1]), tt.stack("w"), tt.stack("w", [0, 2], canonical=2)],
    ids=["other slices", "all slices", "other canonical"],
)
def test_unpack_and_tie_refuse_a_stack_packed_with_other_slices(other):
    w = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))
    packed = tt.pack({"w": w}, tt.TieSpec(s=tt.stack("w", [0, 2])))
    spec = tt.TieSpec(s=other)
    with pytest.raises(
        ValueError, match="w was packed with other tied slices or another canonical"
    ):
        tt.unpack(packed, spec)
    with pytest.raises(
        ValueError, match="w was packed with other tied slices or another canonical"
    ):
        tt.tie(lambda p: jnp.sum(p["w"]), spec)(packed)


def test_unpack_refuses_stacked_data_with_the_wrong_number_of_rows():
    spec = tt.TieSpec(s=tt.stack("w", [0, 2]))
    packed = tt.pack({"w": jnp.ones((4, 2))}, spec)
    packed["w"] = tt.StackedLeaf(packed["w"].data[:2], packed["w"].rows, ("s",), False)
    with pytest.raises(ValueError, match=r"data is f32\[2,2\], but its 4 slices need 3 stored"):
        tt.unpack(packed, spec)


def test_require_equal_treats_nan_as_equal_to_nan_in_every_float_dtype():
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jnp.array([jnp.nan, 1.0], dtype)
        packed = tt.pack({"a": x, "b": x}, tt.TieSpec(g=["a", "b"]), require_equal=True)
        assert isinstance(packed["b"], tt.TiedLeaf)


def test_a_view_that_does_not_fit_shows_what_the_view_gives_and_what_the_members_are():
    spec = tt.TieSpec(head=tt.view("emb", "head", lambda w: w.T.astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="must fit the output of its view") as error:
        tt.pack({"emb": jnp.ones((3, 4)), "head": jnp.ones((4, 3))}, spec)
    message = str(error.value)
    assert "<lambda>(emb) gives bf16[4,3] (from f32[3,4])" in message
    assert "  head  f32[4,3]" in message
    assert "Declare a view" not in message  # one was declared


@pytest.mark.multidevice
def test_one_sharding_applied_to_every_packed_leaf_also_divides_the_layout_records():
    if len(jax.devices()) < 4:
        pytest.skip("needs four devices to shard over; the suite's default XLA_FLAGS give four")
    mesh = jax.make_mesh((4,), ("model",), devices=jax.devices()[:4])
    params = {"a": jnp.arange(16.0).reshape(4, 4), "b": jnp.zeros((4, 4))}
    spec = tt.TieSpec(g=["a", "b"])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    sharded = jax.device_put(tt.pack(params, spec), sharding)
    np.testing.assert_array_equal(tt.unpack(sharded, spec)["b"], params["a"])

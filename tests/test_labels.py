"""`tt.pack_labels`: optimizer labels and masks of the full model, on packed params.

A tie group has one buffer, so it has one label: a label tree written for the full model either
maps onto the packed params (and then optax trains exactly what the untied labels say) or is
refused, naming the members that disagree. Without it, a label on a tied member had no buffer to
act on and was dropped without a word.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close


SPEC = tt.TieSpec(
    head=tt.view("embed", "head", jnp.transpose),
    pair=["b1", "b2"],
    layers=tt.stack("layers", slices=[0, 1]),
)
TRANSFORMS = {"train": optax.sgd(0.5), "frozen": optax.set_to_zero()}


@pytest.fixture
def params(getkey):
    shapes = {"embed": (4, 3), "head": (3, 4), "b1": (3,), "b2": (3,), "layers": (3, 2, 2)}
    p = {k: jax.random.normal(getkey(), s) for k, s in shapes.items()}
    return tt.unpack(tt.pack(p, SPEC), SPEC)  # tied members equal, as packing leaves them


def loss(p):
    h = jnp.tanh(p["embed"] @ (p["b1"] * p["b2"]))
    return jnp.sum((p["head"] @ h) ** 2) + sum(jnp.sum(jnp.sin(p["layers"][i])) for i in range(3))


def _step(transform, labels, params):
    """One optimizer step on packed params; returns the unpacked result."""
    packed = tt.pack(params, SPEC)
    grads = jax.grad(tt.tie(loss, SPEC))(packed)
    tx = transform(tt.pack_labels(labels, SPEC, packed))
    updates, _ = jax.jit(tx.update)(grads, tx.init(packed), packed)
    return tt.unpack(optax.apply_updates(packed, updates), SPEC)


def test_packed_labels_have_the_packed_params_structure(params):
    packed = tt.pack(params, SPEC)
    labels = tt.pack_labels(jax.tree.map(lambda _: "train", params), SPEC, packed)
    assert jax.tree.structure(labels) == jax.tree.structure(packed)
    assert jax.tree.leaves(labels) == ["train"] * len(jax.tree.leaves(packed))


def test_a_frozen_tied_group_stays_frozen_under_multi_transform(params):
    labels = {"embed": "frozen", "head": "frozen", "b1": "train", "b2": "train"}
    labels |= {"layers": "train"}
    stepped = _step(lambda lab: optax.multi_transform(TRANSFORMS, lab), labels, params)
    np.testing.assert_array_equal(stepped["embed"], params["embed"])
    np.testing.assert_array_equal(stepped["head"], params["head"])
    assert not np.array_equal(stepped["b1"], params["b1"])


def test_a_frozen_label_on_a_tied_member_alone_is_refused_naming_both_members(params):
    labels = {"embed": "train", "head": "frozen", "b1": "train", "b2": "train"}
    labels |= {"layers": "train"}
    with pytest.raises(
        ValueError, match=r"(?s)tie group 'head' have different.*embed +'train'.*head +'frozen'"
    ):
        tt.pack_labels(labels, SPEC, tt.pack(params, SPEC))


def test_a_mask_that_splits_a_plain_group_is_refused(params):
    mask = {"embed": True, "head": True, "b1": True, "b2": False, "layers": True}
    with pytest.raises(ValueError, match="tie group 'pair' have different optimizer labels"):
        tt.pack_labels(mask, SPEC, tt.pack(params, SPEC))


def test_masked_updates_only_the_masked_groups_as_it_does_untied(params):
    mask = {"embed": False, "head": False, "b1": True, "b2": True, "layers": True}
    stepped = _step(lambda m: optax.masked(optax.sgd(0.5), m), mask, params)
    # untied reference: masked sgd on the full model, each group's step the sum of its members'
    g = jax.grad(loss)(params)
    pair = g["b1"] + g["b2"]
    rows = g["layers"][0] + g["layers"][1]
    expected = dict(params)  # masked-out leaves: passed through, so sgd's update is the gradient
    expected["embed"] = params["embed"] + (g["embed"] + g["head"].T)
    expected["head"] = expected["embed"].T
    expected["b1"] = expected["b2"] = params["b1"] - 0.5 * pair
    expected["layers"] = params["layers"] - 0.5 * jnp.stack([rows, rows, g["layers"][2]])
    assert_trees_close(stepped, expected, summands=2)


def test_a_weight_decay_mask_decays_only_the_matrices(params):
    mask = jax.tree.map(lambda x: x.ndim > 1, params)
    zero = jax.tree.map(jnp.zeros_like, tt.pack(params, SPEC))
    packed = tt.pack(params, SPEC)
    tx = optax.adamw(0.1, weight_decay=0.5, mask=tt.pack_labels(mask, SPEC, packed))
    with jax.numpy_dtype_promotion("standard"):  # optax mixes weak and strong types
        updates, _ = jax.jit(tx.update)(zero, tx.init(packed), packed)
    full = tt.unpack_grads(updates, SPEC)
    np.testing.assert_allclose(full["head"], -0.1 * 0.5 * params["head"], rtol=1e-6)
    np.testing.assert_array_equal(full["b1"], jnp.zeros(3))


def test_a_label_on_a_subtree_labels_every_leaf_in_it(params):
    model = {"net": params, "extra": {"v": jnp.ones(2), "w": jnp.ones(2)}}
    spec = tt.TieSpec(head=tt.view("net.embed", "net.head", jnp.transpose))
    labels = tt.pack_labels({"extra": "frozen", "net": "train"}, spec, model)
    assert labels["extra"] == {"v": "frozen", "w": "frozen"}
    assert jax.tree.structure(labels) == jax.tree.structure(tt.pack(model, spec))
    assert set(jax.tree.leaves(labels["net"])) == {"train"}


def test_a_label_on_a_subtree_cannot_split_a_group(params):
    model = {"net": params, "extra": {"v": jnp.ones(2)}}
    spec = tt.TieSpec(head=tt.view("net.embed", "extra.v", lambda w: w[0, :2]))
    with pytest.raises(ValueError, match=r"(?s)'head' have different.*extra.v +'frozen'"):
        tt.pack_labels({"extra": "frozen", "net": "train"}, spec, model)


def test_labels_may_be_a_function_of_the_full_model(params):
    packed = tt.pack(params, SPEC)
    by_function = tt.pack_labels(lambda m: jax.tree.map(lambda x: x.ndim > 1, m), SPEC, packed)
    by_tree = tt.pack_labels(jax.tree.map(lambda x: x.ndim > 1, params), SPEC, packed)
    assert jax.tree.structure(by_function) == jax.tree.structure(by_tree)
    assert jax.tree.leaves(by_function) == jax.tree.leaves(by_tree)
    assert by_function["embed"] is True and by_function["b1"] is False


def test_labels_of_another_structure_are_refused(params):
    with pytest.raises(ValueError, match="must have the structure of the full model"):
        tt.pack_labels({"embed": "train"}, SPEC, tt.pack(params, SPEC))


def test_labels_built_from_packed_params_are_refused_with_the_fix(params):
    packed = tt.pack(params, SPEC)
    with pytest.raises(ValueError, match="build them from `tt.unpack"):
        tt.pack_labels(jax.tree.map(lambda _: "train", packed), SPEC, packed)


def test_equinox_labels_map_onto_filtered_packed_params(getkey):
    spec = tt.TieSpec(ffn=["mlp1", "mlp2"])
    mlp = eqx.nn.MLP(3, 3, 4, depth=1, key=getkey())
    model = {"mlp1": mlp, "mlp2": mlp, "out": eqx.nn.Linear(3, 2, key=getkey())}
    arrays = eqx.filter(tt.pack(model, spec), eqx.is_array)
    labels = jax.tree.map(lambda _: "train", eqx.filter(model, eqx.is_array))
    labels["out"] = jax.tree.map(lambda _: "frozen", labels["out"])
    packed_labels = tt.pack_labels(labels, spec, arrays)
    assert jax.tree.structure(packed_labels) == jax.tree.structure(arrays)
    state = optax.multi_transform(TRANSFORMS, packed_labels).init(arrays)
    assert state is not None

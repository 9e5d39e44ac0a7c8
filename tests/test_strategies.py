"""Sharing strategies (ALBERT, Relaxed Recursive Transformers, Mixture-of-Recursions) are the
explicit tie groups they stand for, over a list of blocks and over a scanned stack."""

import dataclasses

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Stack, Tower, assert_trees_close, equations, tower_loss
from tietransform.testing import check_tied


STRATEGIES = ["cycle", "sequence", "middle_cycle", "middle_sequence"]


def _blocks_by_definition(strategy, layers, blocks):
    """Each block's layers, from the papers' definitions (written independently of the library)."""
    if strategy == "cycle":
        return [[i for i in range(layers) if i % blocks == j] for j in range(blocks)]
    if strategy == "sequence":
        run = layers // blocks
        return [list(range(j * run, (j + 1) * run)) for j in range(blocks)]
    inner = _blocks_by_definition(strategy.removeprefix("middle_"), layers - 2, blocks)
    return [[i + 1 for i in members] for members in inner]


def test_the_four_strategies_map_eight_layers_onto_two_blocks():
    assert tt.layer_blocks("cycle", layers=8, blocks=2) == (0, 1, 0, 1, 0, 1, 0, 1)
    assert tt.layer_blocks("sequence", layers=8, blocks=2) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert tt.layer_blocks("middle_cycle", layers=8, blocks=2) == (None, 0, 1, 0, 1, 0, 1, None)
    assert tt.layer_blocks("middle_sequence", layers=8, blocks=2) == (
        None, 0, 0, 0, 1, 1, 1, None,
    )  # fmt: skip


@st.composite
def _strategy_layers_blocks(draw):
    strategy = draw(st.sampled_from(STRATEGIES))
    shared = draw(st.integers(2, 9))
    if strategy.endswith("cycle"):  # any block count, uneven cycles included (5 layers on 2)
        blocks = draw(st.integers(1, shared))
    else:  # a sequence needs equal runs
        blocks = draw(st.sampled_from([k for k in range(1, shared + 1) if shared % k == 0]))
    layers = shared + 2 if strategy.startswith("middle_") else shared
    return strategy, layers, blocks


@hypothesis.given(_strategy_layers_blocks(), st.booleans())
def test_a_strategy_packs_exactly_as_the_explicit_groups_it_stands_for(case, stacked):
    strategy, layers, blocks = case
    if stacked:
        params = {"w": jnp.arange(layers * 2.0).reshape(layers, 2)}
        shared = tt.share_layers("w", strategy, layers=layers, blocks=blocks, stacked=True)
        explicit = {
            f"g{j}": tt.stack("w", members)
            for j, members in enumerate(_blocks_by_definition(strategy, layers, blocks))
            if len(members) > 1
        }
    else:
        params = {"l": [jnp.full(2, float(i)) for i in range(layers)]}
        shared = tt.share_layers("l[*]", strategy, layers=layers, blocks=blocks)
        explicit = {
            f"g{j}": tt.group(*(f"l[{i}]" for i in members))
            for j, members in enumerate(_blocks_by_definition(strategy, layers, blocks))
            if len(members) > 1
        }
    by_strategy = tt.unpack(tt.pack(params, tt.TieSpec(shared)), tt.TieSpec(shared))
    by_hand = tt.unpack(tt.pack(params, tt.TieSpec(explicit)), tt.TieSpec(explicit))
    assert bool(eqx.tree_equal(by_strategy, by_hand))


def test_a_cycled_stack_scanned_with_lax_scan_matches_the_untied_model_and_keeps_k_rows(getkey):
    layers, blocks, d = 6, 2, 4
    spec = tt.TieSpec(
        tt.share_layers("weight", "cycle", layers=layers, blocks=blocks, stacked=True)
    )
    model = Stack(jax.random.normal(getkey(), (layers, d, d)) / 2)
    x = jax.random.normal(getkey(), (3, d))

    def loss(m, x):
        return jnp.sum(jax.vmap(m)(x) ** 2)

    check_tied(loss, spec, model, x)
    packed = tt.pack(model, spec)
    assert packed.weight.data.shape == (blocks, d, d)
    # Inside the scan each layer reads its block's row: no (layers, d, d) array is built,
    # forward or backward, at any depth of the program.
    for fn in (tt.tie(loss, spec), jax.grad(tt.tie(loss, spec))):
        jaxpr = jax.make_jaxpr(fn)(packed, x)
        assert (layers, d, d) not in _all_shapes(jaxpr.jaxpr)
    assert (layers, d, d) in _all_shapes(jax.make_jaxpr(jax.grad(loss))(model, x).jaxpr)


def _all_shapes(jaxpr):
    """Shapes of every value any equation of `jaxpr` makes, inner jaxprs (scan bodies) too."""
    return {tuple(v.aval.shape) for eqn in equations(jaxpr) for v in eqn.outvars}


@pytest.mark.parametrize("init", ["lower", "upper"])
def test_a_shared_list_of_blocks_ties_and_keeps_the_lower_or_upper_member(init, getkey):
    tower = Tower(4, key=getkey())
    spec = tt.TieSpec(tt.share_layers("blocks[*].mlp", "sequence", layers=4, blocks=2, init=init))
    check_tied(tower_loss, spec, tower, jax.random.normal(getkey(), (2, 8)))
    full = tt.unpack(tt.pack(tower, spec), spec)
    kept = 0 if init == "lower" else 1
    weight = full.blocks[0].mlp.layers[0].weight
    np.testing.assert_array_equal(weight, tower.blocks[kept].mlp.layers[0].weight)


@pytest.mark.parametrize(
    ("strategy", "layers", "blocks", "match"),
    [
        ("sequence", 6, 4, "divide into 4 equal runs"),
        ("cycle", 3, 4, "need 1 <= blocks <= 3"),
        ("middle_cycle", 4, 3, "need 1 <= blocks <= 2"),
        ("round_robin", 4, 2, "Unknown sharing strategy 'round_robin'"),
    ],
)
def test_a_strategy_that_cannot_map_the_layers_says_why(strategy, layers, blocks, match):
    with pytest.raises(ValueError, match=match):
        tt.layer_blocks(strategy, layers=layers, blocks=blocks)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stack"])
def test_sharing_declared_for_fewer_layers_than_the_model_has_is_refused(stacked):
    # middle_cycle over 4 layers would leave layers 4 and 5 of a 6-layer model untied.
    if stacked:
        params, path = {"w": jnp.ones((6, 2))}, "w"
    else:
        params, path = {"l": [jnp.ones(2) for _ in range(6)]}, "l[*]"
    shared = tt.share_layers(path, "middle_cycle", layers=4, blocks=1, stacked=stacked)
    with pytest.raises(ValueError, match="shares 4 layers, but .* 6") as error:
        tt.pack(params, tt.TieSpec(shared))
    assert "layers=6" in str(error.value)


def test_share_layers_over_a_list_needs_one_layer_wildcard():
    with pytest.raises(ValueError, match="needs one `\\[\\*\\]` in the path"):
        tt.share_layers("blocks", "cycle", layers=4, blocks=2)


# -- converting an untied model: init="average" ----------------------------------------------


def test_an_averaged_group_stores_the_mean_of_its_members_at_the_canonical_place():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 6.0]), "c": jnp.array([5.0, 1.0])}
    spec = tt.TieSpec(g=tt.group("a", "b", "c", canonical="b", init="average"))
    packed = tt.pack(params, spec)
    np.testing.assert_array_equal(packed["b"], [3.0, 3.0])
    full = tt.unpack(packed, spec)
    assert all(np.array_equal(full[k], [3.0, 3.0]) for k in "abc")
    assert "(init='average': tt.pack stores the members' mean)" in tt.describe(packed, spec)


def test_an_averaged_stack_stores_the_mean_of_its_tied_slices_and_keeps_the_others():
    w = jnp.arange(8.0).reshape(4, 2)
    spec = tt.TieSpec(s=tt.stack("w", [0, 2, 3], init="average"))
    packed = tt.pack({"w": w}, spec)
    expected_mean = np.mean(np.asarray(w)[[0, 2, 3]], axis=0)
    full = tt.unpack(packed, spec)["w"]
    np.testing.assert_allclose(np.asarray(full)[[0, 2, 3]], np.broadcast_to(expected_mean, (3, 2)))
    np.testing.assert_array_equal(full[1], w[1])


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stack"])
def test_share_layers_with_average_init_packs_each_block_as_the_mean_of_its_layers(stacked):
    layers, blocks = 6, 2
    w = np.arange(layers * 3.0).reshape(layers, 3) ** 2
    if stacked:
        params, path = {"w": jnp.asarray(w)}, "w"
    else:
        params, path = {"l": [jnp.asarray(row) for row in w]}, "l[*]"
    shared = tt.share_layers(
        path, "cycle", layers=layers, blocks=blocks, stacked=stacked, init="average"
    )
    spec = tt.TieSpec(shared)
    full = tt.unpack(tt.pack(params, spec), spec)
    rows = np.asarray(full["w"]) if stacked else np.stack([np.asarray(r) for r in full["l"]])
    for layer in range(layers):
        np.testing.assert_allclose(rows[layer], w[layer % blocks :: blocks].mean(axis=0))


def test_averaging_a_subtree_averages_its_floats_and_keeps_the_canonical_integers():
    params = {
        "a": {"w": jnp.array([1.0, 2.0]), "count": jnp.array(3)},
        "b": {"w": jnp.array([3.0, 4.0]), "count": jnp.array(7)},
    }
    spec = tt.TieSpec(g=tt.group("a", "b", init="average"))
    full = tt.unpack(tt.pack(params, spec), spec)
    np.testing.assert_array_equal(full["b"]["w"], [2.0, 3.0])
    assert int(full["b"]["count"]) == 3


def test_averaging_with_require_equal_is_refused():
    floats = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="require_equal=True checks"):
        tt.pack(floats, tt.TieSpec(g=tt.group("a", "b", init="average")), require_equal=True)
    with pytest.raises(ValueError, match="`init` must be one of"):
        tt.group("a", "b", init="mean")


def test_convert_train_save_load_and_export_keep_the_tied_model(tmp_path, getkey):
    """A converted model (cycle onto 2 blocks, averaged) trains, saves, loads into a skeleton of
    the same spec, and exports to a dense untied model whose loss is the tied one's."""
    optax = pytest.importorskip("optax")
    layers, d = 4, 4
    model = Stack(jax.random.normal(getkey(), (layers, d, d)) / 2)
    shared = tt.share_layers("weight", "cycle", layers=layers, blocks=2, stacked=True)
    spec = tt.TieSpec({k: dataclasses.replace(v, init="average") for k, v in shared.items()})
    x = jax.random.normal(getkey(), (3, d))

    def loss(m, x):
        return jnp.sum(jax.vmap(m)(x) ** 2)

    tied = tt.tie(loss, spec)
    packed = tt.pack(model, spec)
    optimizer = optax.sgd(1e-2)
    state = optimizer.init(packed)
    for _ in range(2):
        updates, state = optimizer.update(jax.grad(tied)(packed, x), state)
        packed = optax.apply_updates(packed, updates)
    eqx.tree_serialise_leaves(tmp_path / "recursive.eqx", packed)
    skeleton = eqx.filter_eval_shape(lambda: tt.pack(model, spec))
    loaded = tt.tree_deserialise_leaves(tmp_path / "recursive.eqx", skeleton)
    assert bool(eqx.tree_equal(loaded, packed))
    dense = tt.unpack(loaded, spec)  # the export: an untied model, layer i holding block i % 2
    np.testing.assert_array_equal(dense.weight[2], dense.weight[0])
    np.testing.assert_array_equal(dense.weight[3], dense.weight[1])
    # The same float32 program but for the tie's substitution; a sum of 12 squares.
    assert_trees_close(tied(loaded, x), loss(dense, x), summands=x.size)

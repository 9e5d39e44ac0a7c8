"""Relaxed ties (`tt.relaxed`): each member reads `W + B_l @ A_l`, the shared weight plus its own
low-rank delta, without `W + B_l @ A_l` ever being built for a matmul."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tietransform as tt
from tests.helpers import equations
from tietransform.testing import TieCheckError, check_tied, tolerance


L, D, H = 4, 6, 5


def _stacked(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "blocks": {
            "w": jax.random.normal(k[0], (L, D, H)) / 3,
            "b": jax.random.normal(k[1], (L, H)),
            "out": jax.random.normal(k[2], (L, H, D)) / 3,
        }
    }


def _listed(seed: int = 0) -> dict:
    blocks = _stacked(seed)["blocks"]
    return {"blocks": [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(L)]}


X = jax.random.normal(jax.random.key(9), (3, D))


def _layer(h, layer):
    return h + jnp.tanh(h @ layer["w"] + layer["b"][None]) @ layer["out"]


def scanned_loss(model, x):
    h, _ = lax.scan(lambda h, layer: (_layer(h, layer), None), x, model["blocks"])
    return jnp.sum(h**2)


def listed_loss(model, x):
    for layer in model["blocks"]:
        x = _layer(x, layer)
    return jnp.sum(x**2)


def _dots(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
    """The (operand shapes, output shape) of every dot_general, inner jaxprs included."""
    return [
        (tuple(v.aval.shape for v in eqn.invars), tuple(eqn.outvars[0].aval.shape))
        for eqn in equations(jaxpr)
        if eqn.primitive is lax.dot_general_p
    ]


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every array shape a jaxpr (inner jaxprs included) computes."""
    return {
        tuple(v.aval.shape)
        for eqn in equations(jaxpr)
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    }


# -- what pack stores ------------------------------------------------------------------------
def test_a_relaxed_group_stores_w_once_and_each_members_factors():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    w = [packed["blocks"][i]["w"] for i in range(L)]
    assert all(isinstance(x, tt.RelaxedLeaf) for x in w)
    assert w[0].shared.shape == (D, H) and all(x.shared is None for x in w[1:])
    assert all(x.lora_b.shape == (D, 2) and x.lora_a.shape == (2, H) for x in w)
    # Biases are not matrices: tied strictly by default.
    assert all(isinstance(packed["blocks"][i]["b"], tt.TiedLeaf) for i in range(1, L))
    assert "holds W" in repr(w[0]) and "rank-2 delta" in repr(w[1])


def test_others_own_keeps_non_matrix_leaves_per_member():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2, others="own")))
    model = _listed()
    packed = tt.pack(model, spec)
    for i in range(L):
        assert eqx.is_array(packed["blocks"][i]["b"])
        np.testing.assert_array_equal(packed["blocks"][i]["b"], model["blocks"][i]["b"])


def test_a_relaxed_stack_keeps_its_rows_and_one_factor_row_per_relaxed_slice():
    spec = tt.TieSpec(
        tt.share_layers(
            "blocks", "middle_cycle", layers=L, blocks=1, stacked=True, relax=tt.relaxed(3)
        )
    )
    leaf = tt.pack(_stacked(), spec)["blocks"]["w"]
    assert isinstance(leaf, tt.StackedLeaf)
    assert leaf.rows == (0, 1, 1, 2) and leaf.factor_rows == (-1, 0, 1, -1)
    assert leaf.lora_b.shape == (2, D, 3) and leaf.lora_a.shape == (2, 3, H)


@pytest.mark.parametrize("init", ["canonical", "average"])
def test_full_rank_svd_conversion_gives_back_the_untied_model(init):
    model = _stacked()
    spec = tt.TieSpec(ffn=tt.stack("blocks", init=init, relax=tt.relaxed(min(D, H), others="own")))
    restored = tt.unpack(tt.pack(model, spec), spec)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(model), strict=True):
        # An SVD and its product, in float32: a few ulps of the residual per entry.
        np.testing.assert_allclose(got, want, atol=50 * float(jnp.finfo(jnp.float32).eps))


def test_a_low_rank_conversion_is_the_best_approximation_of_the_residual():
    model = _listed()
    spec = tt.TieSpec(blk=tt.group("blocks[*].w", relax=tt.relaxed(2)))
    restored = tt.unpack(tt.pack(model, spec), spec)
    w0 = np.asarray(model["blocks"][0]["w"], np.float64)
    for i in range(1, L):
        residual = np.asarray(model["blocks"][i]["w"], np.float64) - w0
        tail = np.linalg.svd(residual, compute_uv=False)[2:]
        error = np.asarray(restored["blocks"][i]["w"], np.float64) - np.asarray(
            model["blocks"][i]["w"], np.float64
        )
        # Eckart-Young: the rank-2 truncation's Frobenius error is the tail's norm.
        np.testing.assert_allclose(np.linalg.norm(error), np.linalg.norm(tail), rtol=1e-4)


def test_zero_init_starts_every_member_at_w_and_every_factor_trains():
    model = _listed()
    spec = tt.TieSpec(blk=tt.group("blocks[*].w", relax=tt.relaxed(2, init="zeros")))
    packed = tt.pack(model, spec)
    restored = tt.unpack(packed, spec)
    for i in range(L):
        np.testing.assert_array_equal(restored["blocks"][i]["w"], model["blocks"][0]["w"])
        leaf = packed["blocks"][i]["w"]
        assert not np.any(leaf.lora_b) and np.all(np.linalg.norm(leaf.lora_a, axis=1) > 0)
    grads = jax.grad(tt.tie(listed_loss, spec))(packed, X)
    for i in range(L):  # B = 0 gets G A^T, nonzero; A gets B^T G = 0 on the first step
        assert np.linalg.norm(grads["blocks"][i]["w"].lora_b) > 0


def test_the_canonical_member_equal_to_w_gets_trainable_factors_too():
    spec = tt.TieSpec(blk=tt.group("blocks[*].w", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    canonical = packed["blocks"][0]["w"]  # its residual is zero: B = 0, A random
    assert not np.any(canonical.lora_b) and np.any(canonical.lora_a)
    grads = jax.grad(tt.tie(listed_loss, spec))(packed, X)
    assert np.linalg.norm(grads["blocks"][0]["w"].lora_b) > 0


# -- values and gradients --------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_relaxed_strategies_match_the_untied_model_at_w_plus_ba(strategy, stacked):
    blocks = 1 if strategy.startswith("middle") else 2
    path = "blocks" if stacked else "blocks[*]"
    spec = tt.TieSpec(
        tt.share_layers(
            path,
            strategy,
            layers=L,
            blocks=blocks,
            stacked=stacked,
            init="average",
            relax=tt.relaxed(2),
        )
    )
    fn, model = (scanned_loss, _stacked()) if stacked else (listed_loss, _listed())
    check_tied(fn, spec, model, X)


def test_check_tied_catches_a_dropped_factor_gradient(monkeypatch):
    import tietransform._rewrite as rewrite

    original = rewrite.low_rank_dot

    def frozen_b(eqn, invals, bind):
        invals = [
            rewrite.LowRankRead(v.w, lax.stop_gradient(v.b), v.a, v.scale, v.groups)
            if isinstance(v, rewrite.LowRankRead)
            else v
            for v in invals
        ]
        return original(eqn, invals, bind)

    monkeypatch.setattr(rewrite, "low_rank_dot", frozen_b)
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    with pytest.raises(TieCheckError, match=r"lora_b"):
        check_tied(listed_loss, spec, _listed(), X)


def test_a_relaxed_read_outside_a_matmul_is_built_for_that_use_and_stays_right():
    def decayed(model, x):
        penalty = sum(jnp.sum(layer["w"] ** 2) for layer in model["blocks"])
        return listed_loss(model, x) + 0.1 * penalty

    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(3)))
    check_tied(decayed, spec, _listed(), X)


def test_equinox_linear_layers_relax_in_their_own_orientation():
    keys = jax.random.split(jax.random.key(3), L)
    model = [eqx.nn.Linear(D, D, key=k) for k in keys]

    def loss(layers, x):
        for layer in layers:
            x = jnp.tanh(jax.vmap(layer)(x))
        return jnp.sum(x**2)

    spec = tt.TieSpec(lin=tt.group("[*]", relax=tt.relaxed(2), init="average"))
    check_tied(loss, spec, model, X)
    jaxpr = jax.make_jaxpr(tt.tie(loss, spec))(tt.pack(model, spec), X)
    built = [out for ins, out in _dots(jaxpr) if ins == ((D, 2), (2, D))]
    assert not built, f"W + B A was built: {built}"


# -- the rewrite: W + B A is never built for a matmul ----------------------------------------
def test_a_matmul_of_a_relaxed_member_never_builds_w_plus_ba():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    tied = tt.tie(listed_loss, spec)
    for program in (jax.make_jaxpr(tied)(packed, X), jax.make_jaxpr(jax.grad(tied))(packed, X)):
        dots = _dots(program)
        assert ((X.shape, (D, 2)), (3, 2)) in dots  # x @ B
        assert not [d for d in dots if d[1] == (D, H) and (D, 2) in d[0]], dots


def test_inside_a_scan_the_shared_rows_are_loop_constants_and_no_stack_is_built():
    spec = tt.TieSpec(ffn=tt.stack("blocks", init="average", relax=tt.relaxed(2)))
    packed = tt.pack(_stacked(), spec)
    tied = tt.tie(scanned_loss, spec)
    for program in (jax.make_jaxpr(tied)(packed, X), jax.make_jaxpr(jax.grad(tied))(packed, X)):
        shapes = _shapes(program)
        assert (L, D, H) not in shapes and (L, H, D) not in shapes, "an L-fold stack was built"
        factors = {(D, 2), (2, H), (H, 2), (2, D)}
        built = [d for d in _dots(program) if d[1] in ((D, H), (H, D)) and factors & set(d[0])]
        assert not built, f"B @ A was built: {built}"  # (x^T g, a weight's gradient, is fine)


def test_a_cast_of_a_relaxed_read_casts_each_factor_and_stays_lazy():
    def bf16_loss(model, x):
        model = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model)
        return listed_loss(model, x.astype(jnp.bfloat16)).astype(jnp.float32)

    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    model = _listed()
    packed = tt.pack(model, spec)
    tied = tt.tie(bf16_loss, spec)
    dots = _dots(jax.make_jaxpr(tied)(packed, X))
    assert not [d for d in dots if d[1] == (D, H)]
    # bfloat16 reassociated against bfloat16 dense: both within bf16 rounding of the f32 value.
    reference = listed_loss(tt.unpack(packed, spec), X)
    assert abs(float(tied(packed, X)) - float(reference)) <= 0.05 * abs(float(reference))


def test_relaxed_reads_compose_with_jit_vmap_and_checkpoint():
    spec = tt.TieSpec(ffn=tt.stack("blocks", relax=tt.relaxed(2)))
    packed = tt.pack(_stacked(), spec)
    full = tt.unpack(packed, spec)

    def remat_loss(model, x):
        body = jax.checkpoint(lambda h, layer: (_layer(h, layer), None))
        return jnp.sum(lax.scan(body, x, model["blocks"])[0] ** 2)

    xs = jnp.stack([X, 2 * X])
    tied = jax.jit(jax.vmap(tt.tie(remat_loss, spec), in_axes=(None, 0)))
    np.testing.assert_allclose(
        tied(packed, xs), jax.vmap(remat_loss, in_axes=(None, 0))(full, xs), rtol=1e-5
    )
    grads = jax.grad(lambda p: tt.tie(remat_loss, spec)(p, X))(packed)
    reference = jax.grad(lambda p: tt.tie(scanned_loss, spec)(p, X))(packed)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_ffn_on_relaxed_weights_is_reported_left_to_xla():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    with tt.ffn_routing_report() as routed:
        jax.make_jaxpr(tt.tie(listed_loss, spec, fuse_ffn=True))(packed, X)
    assert routed and all("left to XLA: relaxed tie" in str(r) for r in routed), routed


# -- optimizers, checkpoints, describe -------------------------------------------------------
def test_describe_counts_the_factors():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    text = tt.describe(tt.pack(_listed(), spec), spec)
    factors = 2 * L * (D * 2 + 2 * H)  # w (6x5) and out (5x6), rank 2 each
    assert (
        f"relaxed (rank 2, svd): each member reads W + B @ A on its matrices; {factors:,}" in text
    )


def test_pack_labels_label_each_members_factors():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    labels = tt.pack_labels("train", spec, packed)
    assert jax.tree.structure(labels) == jax.tree.structure(packed)
    assert set(jax.tree.leaves(labels)) == {"train"}


def test_unpack_grads_shows_the_first_order_change_of_each_member():
    spec = tt.TieSpec(blk=tt.group("blocks[*].w", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    grads = jax.grad(tt.tie(listed_loss, spec))(packed, X)
    shown = tt.unpack_grads(grads, spec, params=packed)
    i = 2
    g, p = grads["blocks"][i]["w"], packed["blocks"][i]["w"]
    expected = grads["blocks"][0]["w"].shared + g.lora_b @ p.lora_a + p.lora_b @ g.lora_a
    np.testing.assert_allclose(shown["blocks"][i]["w"], expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_round_trips_and_another_rank_is_refused(tmp_path):
    path = tmp_path / "relaxed.eqx"
    spec = tt.TieSpec(ffn=tt.stack("blocks", relax=tt.relaxed(2)))
    packed = tt.pack(_stacked(), spec)
    eqx.tree_serialise_leaves(path, packed)
    loaded = tt.tree_deserialise_leaves(path, tt.pack(_stacked(seed=1), spec))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(packed), strict=True):
        np.testing.assert_array_equal(a, b)
    other = tt.TieSpec(ffn=tt.stack("blocks", relax=tt.relaxed(3)))
    with pytest.raises(ValueError, match="layout"):
        tt.tree_deserialise_leaves(path, tt.pack(_stacked(), other))


def test_strict_params_under_a_relaxed_spec_are_refused():
    strict = tt.TieSpec(blk=tt.group("blocks[*]"))
    relaxed = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), strict)
    with pytest.raises(ValueError, match="expects a RelaxedLeaf"):
        tt.unpack(packed, relaxed)
    with pytest.raises(ValueError, match="do not match the spec"):
        tt.unpack(tt.pack(_listed(), relaxed), strict)


# -- clear errors ----------------------------------------------------------------------------
def test_a_rank_larger_than_the_matrix_is_refused_naming_the_path():
    spec = tt.TieSpec(blk=tt.group("blocks[*].w", relax=tt.relaxed(H + 1)))
    with pytest.raises(
        ValueError, match=r"rank 6 is larger than the matrix blocks\[0\]\.w \(6x5\)"
    ):
        tt.pack(_listed(), spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "positive int"),
        ({"rank": 2, "init": "lora"}, "`init` must be one of"),
        ({"rank": 2, "others": "mine"}, "`others` must be one of"),
    ],
)
def test_bad_relaxed_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tt.relaxed(**kwargs)


def test_relax_must_be_a_relaxed_option():
    with pytest.raises(TypeError, match=r"`relax` must be `tt.relaxed\(rank\)`"):
        tt.group("blocks[*]", relax=4)


def test_a_view_of_a_relaxed_member_is_refused():
    spec = tt.TieSpec(
        blk=tt.group("blocks[*].w", relax=tt.relaxed(2)),
        head=tt.view("blocks[1].w", "blocks[0].out", jnp.transpose),
    )
    with pytest.raises(ValueError, match="member of the relaxed tie group 'blk'"):
        tt.pack(_listed(), spec)


def test_two_ranks_on_one_stacked_array_are_refused():
    spec = tt.TieSpec(
        a=tt.stack("blocks.w", [0, 1], relax=tt.relaxed(1)),
        b=tt.stack("blocks.w", [2, 3], relax=tt.relaxed(2)),
    )
    with pytest.raises(ValueError, match="different ranks"):
        tt.pack(_stacked(), spec)


def test_tolerance_widening_is_what_the_reassociated_sums_need():
    # The f32 value of a relaxed model differs from the dense reference by reassociated sums
    # only: well inside tolerance(f32, m + n + r per relaxed read), far outside bf16's eps.
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    packed = tt.pack(_listed(), spec)
    got = float(tt.tie(listed_loss, spec)(packed, X))
    want = float(listed_loss(tt.unpack(packed, spec), X))
    assert abs(got - want) <= tolerance(jnp.float32, L * (D + H + 2)) * abs(want)


def test_orbax_round_trips_relaxed_params_and_refuses_another_rank(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))

    def saved(tree):  # orbax refuses zero-size arrays (the layout records)
        return eqx.filter(tree, lambda x: eqx.is_array(x) and x.size > 0)

    packed = tt.pack(_listed(), spec)
    checkpointer.save(tmp_path / "ckpt", saved(packed))
    checkpointer.wait_until_finished()
    skeleton = tt.pack(_listed(seed=1), spec)
    restored = eqx.combine(
        tt.orbax_restore(checkpointer, tmp_path / "ckpt", saved(skeleton)), skeleton
    )
    tied = tt.tie(listed_loss, spec)
    assert float(tied(restored, X)) == float(tied(packed, X))
    other = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(3)))
    with pytest.raises(ValueError, match="another tie layout"):
        tt.orbax_restore(checkpointer, tmp_path / "ckpt", saved(tt.pack(_listed(), other)))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_an_ensemble_of_relaxed_models_maps_with_vmap(stacked):
    make, fn = (_stacked, scanned_loss) if stacked else (_listed, listed_loss)
    decl = (
        tt.stack("blocks", relax=tt.relaxed(2))
        if stacked
        else tt.group("blocks[*]", relax=tt.relaxed(2))
    )
    spec = tt.TieSpec(blk=decl)
    members = [tt.pack(make(seed), spec) for seed in range(3)]
    ensemble = jax.tree.map(lambda *a: jnp.stack(a), *members)
    got = jax.vmap(tt.tie(fn, spec), in_axes=(0, None))(ensemble, X)
    want = jnp.stack([tt.tie(fn, spec)(m, X) for m in members])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_require_equal_is_refused_for_relaxed_groups():
    spec = tt.TieSpec(blk=tt.group("blocks[*]", relax=tt.relaxed(2)))
    with pytest.raises(ValueError, match=r"groups \['blk'\] are relaxed"):
        tt.pack(_listed(), spec, require_equal=True)


def test_a_relaxed_checkpoint_loaded_into_a_strict_skeleton_names_the_layout(tmp_path):
    # The strict bias keeps the strict layout in both specs: records are compared in order.
    path = tmp_path / "relaxed.eqx"
    relaxed = tt.TieSpec(ffn=tt.stack("blocks", relax=tt.relaxed(2)))
    strict = tt.TieSpec(ffn=tt.stack("blocks"))
    eqx.tree_serialise_leaves(path, tt.pack(_stacked(), relaxed))
    with pytest.raises(ValueError, match="was saved under another tie layout"):
        tt.tree_deserialise_leaves(path, tt.pack(_stacked(), strict))


def test_check_tied_says_why_a_bfloat16_relaxed_model_differs_by_rounding():
    def bf16_loss(model, x):
        model = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model)
        return scanned_loss(model, x.astype(jnp.bfloat16)).astype(jnp.float32)

    spec = tt.TieSpec(ffn=tt.stack("blocks", relax=tt.relaxed(2)))
    # Reassociated bfloat16 sums, against float32 tolerances: reported, with the reason.
    with pytest.raises(TieCheckError, match="Check relaxed ties with float32 compute"):
        check_tied(bf16_loss, spec, _stacked(), X)

"""`tie`: values and gradients of the tied function, its audits, and its stacked-scan rewrite."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Stack, Tower, assert_trees_close, tower_loss
from tietransform.testing import check_tied


SPEC = tt.TieSpec(ffn="blocks[*].mlp")


@pytest.fixture
def tower(getkey):
    return Tower(4, key=getkey())


@pytest.fixture
def x(getkey):
    return jax.random.normal(getkey(), (5, 8))


def test_tied_value_equals_untied_value_at_the_unpacked_model(tower, x):
    packed = tt.pack(tower, SPEC)
    assert_trees_close(tt.tie(tower_loss, SPEC)(packed, x), tower_loss(tt.unpack(packed, SPEC), x))


def test_group_gradient_is_the_sum_of_member_gradients(tower, x):
    packed = tt.pack(tower, SPEC)
    grads = eqx.filter_grad(tt.tie(tower_loss, SPEC))(packed, x)
    member_grads = eqx.filter_grad(tower_loss)(tt.unpack(packed, SPEC), x)
    expected = sum(np.asarray(b.mlp.layers[0].weight, np.float64) for b in member_grads.blocks)
    np.testing.assert_allclose(grads.blocks[0].mlp.layers[0].weight, expected, rtol=1e-5, atol=1e-7)
    assert isinstance(grads.blocks[1].mlp.layers[0].weight, tt.TiedLeaf)


def test_check_tied_accepts_a_tower_with_a_tied_ffn(tower, x):
    check_tied(tower_loss, SPEC, tower, x)


def test_view_gradient_is_pulled_back_through_the_view(getkey):
    spec = tt.TieSpec(head=tt.view("emb", "head", jnp.transpose))
    params = {"emb": jax.random.normal(getkey(), (6, 4)), "head": jnp.zeros((4, 6))}
    tokens = jnp.array([1, 3, 5])

    def lm(p, tokens):
        hidden = jnp.tanh(p["emb"][tokens])
        return jax.nn.logsumexp(hidden @ p["head"], axis=-1).sum()

    check_tied(lm, spec, params, tokens)


def test_stacked_tie_gradient_sums_the_tied_slices(getkey):
    spec = tt.TieSpec(shared=tt.stack("weight", [0, 2, 3]))
    model = Stack(jax.random.normal(getkey(), (5, 4, 4)) / 2)
    check_tied(lambda m, x: m(x).sum(), spec, model, jax.random.normal(getkey(), (4,)))


def test_decorator_and_call_forms_are_the_same(tower, x):
    packed = tt.pack(tower, SPEC)
    decorated = tt.tie(SPEC)(tower_loss)
    assert decorated(packed, x) == tt.tie(tower_loss, SPEC)(packed, x)
    assert decorated.__name__ == "tower_loss"


def test_a_spec_without_groups_returns_the_function_itself():
    assert tt.tie(tower_loss, tt.TieSpec()) is tower_loss
    assert tt.tie(tt.TieSpec())(tower_loss) is tower_loss


def test_static_arguments_and_non_array_outputs_pass_through(tower, x):
    @tt.tie(SPEC)
    def run(model, x, *, scale, label):
        return {"loss": scale * tower_loss(model, x), "label": label}

    out = run(tt.pack(tower, SPEC), x, scale=2.0, label="train")
    assert out["label"] == "train"
    np.testing.assert_allclose(
        out["loss"], 2.0 * tower_loss(tt.unpack(tt.pack(tower, SPEC), SPEC), x), rtol=1e-6
    )


def test_tied_function_refuses_a_full_model(tower, x):
    with pytest.raises(ValueError, match="takes packed params, but it was given a full model"):
        tt.tie(tower_loss, SPEC)(tower, x)


def test_tied_function_refuses_params_packed_with_another_spec(tower, x):
    packed = tt.pack(tower, tt.TieSpec(ffn="blocks[*].mlp.layers[0]"))
    with pytest.raises(ValueError, match="packed params do not match the spec"):
        tt.tie(tower_loss, SPEC)(packed, x)


def test_parameters_captured_by_closure_are_refused(tower, x):
    packed = tt.pack(tower, SPEC)

    @tt.tie(SPEC)
    def loss(model, x):
        return tower_loss(tower, x)  # reads the closed-over model, not `model`

    with pytest.raises(ValueError, match="reads parameters captured by closure"):
        loss(packed, x)


def test_an_unrelated_constant_equal_to_a_uniform_parameter_is_not_taken_for_a_closure():
    params = {"a": jnp.zeros(3), "c": jnp.zeros(3), "w": jnp.eye(3)}
    spec = tt.TieSpec(g=["a", "c"])
    offset = jnp.zeros(3)  # equals the zero biases by value, by chance

    def loss(p, x):
        return jnp.sum(p["w"] @ x + offset) + jnp.sum(p["a"])

    with pytest.warns(tt.UnreadMemberWarning, match="Member c"):
        tt.tie(loss, spec)(tt.pack(params, spec), jnp.ones(3))


def test_a_member_that_is_never_read_warns(tower, x):
    @tt.tie(SPEC)
    def loss(model, x):
        return tower_loss(eqx.tree_at(lambda m: m.blocks, model, model.blocks[:3]), x)

    with pytest.warns(
        tt.UnreadMemberWarning, match=r"Member blocks\[3\]\.mlp of tie group 'ffn' is never read"
    ):
        loss(tt.pack(tower, SPEC), x)


def test_a_member_read_only_by_dead_code_warns(tower, x):
    @tt.tie(SPEC)
    def loss(model, x):
        model.blocks[3](x[0])  # computed, then discarded
        return tower_loss(eqx.tree_at(lambda m: m.blocks, model, model.blocks[:3]), x)

    with pytest.warns(tt.UnreadMemberWarning, match=r"blocks\[3\]\.mlp"):
        loss(tt.pack(tower, SPEC), x)


def test_audit_can_be_switched_off(tower, x):
    loss = tt.tie(
        lambda m, x: tower_loss(eqx.tree_at(lambda m: m.blocks, m, m.blocks[:3]), x),
        SPEC,
        audit=False,
    )
    loss(tt.pack(tower, SPEC), x)  # no warning: pytest turns warnings into errors


def test_matmul_precision_is_read_at_every_call_not_cached(getkey):
    spec = tt.TieSpec(g=["a", "b"])
    params = {"a": jax.random.normal(getkey(), (8, 8)), "b": jnp.zeros((8, 8))}
    tied = tt.tie(lambda p, x: x @ p["a"] @ p["b"], spec)
    packed = tt.pack(params, spec)
    x = jax.random.normal(getkey(), (8,))
    with jax.default_matmul_precision("highest"):
        high = jax.make_jaxpr(tied)(packed, x)
    default = jax.make_jaxpr(tied)(packed, x)
    assert "HIGHEST" in str(high)
    assert "HIGHEST" not in str(default)


def test_scan_over_a_stacked_tie_reads_the_kept_slices_without_an_L_fold_copy(getkey):
    spec = tt.TieSpec(shared=tt.stack("weight", list(range(16))))
    model = Stack(jax.random.normal(getkey(), (16, 8, 8)))
    jaxpr = str(jax.make_jaxpr(tt.tie(lambda m, x: m(x), spec))(tt.pack(model, spec), jnp.ones(8)))
    assert "f32[16,8,8]" not in jaxpr  # the full stack is never built
    assert "f32[1,8,8]" in jaxpr and "dynamic_slice" in jaxpr


def test_stacked_tie_read_outside_a_scan_is_materialised_correctly(getkey):
    spec = tt.TieSpec(shared=tt.stack("w", [0, 1]))
    params = {"w": jax.random.normal(getkey(), (3, 2))}
    with pytest.warns(tt.StackMaterialisedWarning, match="are read by `reduce_sum`"):
        check_tied(lambda p: jnp.sum(p["w"] ** 3), spec, params)


def test_stacked_tie_inside_jit_and_checkpoint_is_still_rewritten(getkey):
    spec = tt.TieSpec(shared=tt.stack("weight", list(range(16))))
    model = Stack(jax.random.normal(getkey(), (16, 8, 8)))

    @jax.jit
    @jax.checkpoint
    def inner(m, x):
        return m(x)

    jaxpr = str(jax.make_jaxpr(tt.tie(inner, spec))(tt.pack(model, spec), jnp.ones(8)))
    assert "f32[16,8,8]" not in jaxpr
    check_tied(lambda m, x: inner(m, x).sum(), spec, model, jnp.ones(8))


def test_stacked_tie_passed_to_an_unrewritten_primitive_warns_and_stays_correct(getkey):
    spec = tt.TieSpec(shared=tt.stack("w", [0, 1]))
    params = {"w": jax.random.normal(getkey(), (3, 2))}

    def f(p, pred):
        return jax.lax.cond(pred, lambda w: jnp.sum(w**2), lambda w: jnp.sum(w), p["w"])

    with pytest.warns(tt.StackMaterialisedWarning, match=r"read by `cond`"):
        check_tied(f, spec, params, jnp.array(True))

"""The Universal Transformer example: it trains, its tie is exact, and it keeps one FFN."""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tietransform as tt
from tests.helpers import array_bytes
from tietransform import kernels
from tietransform.testing import check_tied


_PATH = pathlib.Path(__file__).parents[1] / "examples" / "universal_transformer.py"
_spec = importlib.util.spec_from_file_location("universal_transformer", _PATH)
assert _spec is not None and _spec.loader is not None
ut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ut)

N, WIDTH, DIGITS = 2, 16, 3


@pytest.fixture(scope="module")
def tiny():
    model = ut._build_jitted(N, WIDTH, DIGITS, jax.random.key(0))
    tokens, targets = ut.addition_batch(jax.random.key(1), 4, DIGITS)
    return model, tokens, targets


def test_addition_targets_are_the_digits_of_the_sum():
    tokens, targets = ut.addition_batch(jax.random.key(0), 16, 4)
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    powers = 10 ** np.arange(tokens.shape[1])
    a, b = (tokens // 10 * powers).sum(axis=1), (tokens % 10 * powers).sum(axis=1)
    np.testing.assert_array_equal((targets * powers).sum(axis=1), a + b)


def test_example_trains_and_its_loss_decreases():
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak and strong types
        metrics = ut.train(n=2, width=16, digits=3, steps=40, batch=32, lr=1e-2, log_every=10)
    assert metrics.losses[-1] < 0.8 * metrics.losses[0]


def test_tied_gradient_of_the_stacked_mlp_is_the_sum_of_per_repetition_gradients(tiny):
    model, tokens, targets = tiny
    check_tied(lambda m, x, y: ut.loss_fn(m, x, y)[0], ut.SPEC, model, tokens, targets)


def test_packed_params_and_adam_state_hold_one_mlp(tiny):
    model, _, _ = tiny
    packed = tt.pack(model, ut.SPEC)
    one_mlp = array_bytes(model.blocks.mlp) // N
    assert array_bytes(packed.blocks.mlp) == one_mlp
    assert array_bytes(packed) == array_bytes(model) - (N - 1) * one_mlp
    with jax.numpy_dtype_promotion("standard"):
        state = optax.adam(1e-3).init(eqx.filter(packed, eqx.is_array))
    assert array_bytes(state) == 2 * array_bytes(packed) + 4  # mu, nu and the int32 step count


def test_mixed_precision_keeps_float32_masters_and_routes_the_ffn_as_a_bfloat16_site(tiny):
    # Traced only (no compile): the report and the gradient dtypes are known at trace time.
    model, tokens, targets = tiny
    packed = tt.pack(model, ut.SPEC)
    routed_loss = tt.tie(ut.mixed_loss_fn, ut.SPEC, fuse_ffn="interpret")
    with tt.ffn_routing_report() as routed:
        grads = eqx.filter_eval_shape(
            eqx.filter_grad(routed_loss, has_aux=True), packed, tokens, targets
        )
    assert [r.served_by for r in routed] == ["kernels.ffn[interpret]"]
    assert routed[0].shape.startswith("FFN bfloat16[")
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_the_default_ffn_shape_is_one_the_mosaic_gpu_kernels_serve_in_bfloat16():
    width = 64  # the demo's default; hidden is 4 * width
    s = jax.ShapeDtypeStruct
    x, ws, w2 = (
        s((64, width), jnp.bfloat16),
        (s((width, 4 * width), jnp.bfloat16),),
        s((4 * width, width), jnp.bfloat16),
    )
    assert kernels.ffn_support(x, ws, w2, implementation="interpret", backend="gpu").reason is None


def test_an_unknown_precision_is_refused_before_training():
    with pytest.raises(ValueError, match="precision must be one of"):
        ut.train(n=2, width=16, digits=3, steps=1, precision="float8")  # type: ignore[arg-type]

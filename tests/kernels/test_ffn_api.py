"""Dispatch and input validation of `kernels.ffn` / `kernels.gated_ffn`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.helpers import Problem, assert_close, scan_loss
from tietransform import kernels


def _args(m=8, d=4, h=6, dtype=jnp.float32):
    return (
        jnp.ones((m, d), dtype),
        jnp.ones((d, h), dtype),
        jnp.ones((h,), dtype),
        jnp.ones((h, d), dtype),
        jnp.ones((d,), dtype),
    )


_cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks CPU dispatch")


@pytest.fixture
def on_cpu():
    """The XLA and interpret implementations on the CPU device (full float32 matmuls, the same
    fusion decisions for the plain and the rematerialised reference), whatever the machine."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@_cpu_only
def test_auto_on_cpu_is_the_reference():
    data = Problem(24, 8, 40, "float32", "gelu", False, True, 1)
    params, x = data.params(), data.x()
    np.testing.assert_array_equal(data.apply(params, x), data.apply(params, x, reference=True))


def test_xla_remat_matches_the_reference_and_its_gradients(on_cpu):
    data = Problem(24, 8, 40, "bfloat16", "silu", True, True, 2)
    params, x = data.params(), data.x()
    g = jax.grad(scan_loss(data, 2, implementation="xla_remat"))(params, x)
    r = jax.grad(scan_loss(data, 2, reference=True))(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r), strict=True):
        assert_close(a, b, 1e-6)


@_cpu_only
def test_pallas_on_cpu_points_to_interpret():
    with pytest.raises(ValueError, match='implementation="pallas" needs a GPU or TPU'):
        kernels.ffn(*_args(), implementation="pallas")


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        kernels.ffn(*_args(), implementation="triton")


def test_wrong_weight_shape_names_the_argument():
    x, w1, b1, w2, b2 = _args()
    with pytest.raises(ValueError, match=r"`w1` must have shape \(d, hidden\)") as e:
        kernels.ffn(x, w1.T, b1, w2, b2)
    assert "w1: f32[6,4]" in str(e.value)


def test_wrong_bias_shape_names_the_argument():
    x, w1, b1, w2, b2 = _args()
    with pytest.raises(ValueError, match=r"`b2` must have shape \(d_out,\)"):
        kernels.ffn(x, w1, b1, w2, b1)


def test_gated_weights_must_share_a_shape():
    x, w1, _, w2, _ = _args()
    with pytest.raises(ValueError, match="`wu` must have the shape of `wg`"):
        kernels.gated_ffn(x, w1, w1[:, :3], w2)


def test_mixed_dtypes_are_rejected_with_every_dtype_listed():
    x, w1, b1, w2, b2 = _args()
    with pytest.raises(ValueError, match="all arguments must have the same dtype") as e:
        kernels.ffn(x, w1.astype(jnp.bfloat16), b1, w2, b2)
    assert "w1: bf16[4,6]" in str(e.value) and "x: f32[8,4]" in str(e.value)


def test_integer_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype int32 is not supported"):
        kernels.ffn(*_args(dtype=jnp.int32))


def test_biases_are_optional(on_cpu):
    x, w1, _, w2, _ = _args()
    out = kernels.ffn(x, w1, None, w2, None, implementation="interpret")
    ref = kernels.ffn_reference(x, w1, None, w2, None)
    assert_close(out, ref, 1e-6)


@pytest.mark.parametrize("name", ["block_m", "block_h"])
@pytest.mark.parametrize("value", [0, -64, 16.0, True])
def test_a_block_that_is_not_a_positive_int_is_rejected_with_its_name(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int or None"):
        kernels.ffn(*_args(), implementation="interpret", **{name: value})


def _specs(dtype, d=64, hidden=128, d_out=64, tokens=100, arity=1):
    s = jax.ShapeDtypeStruct
    ws = tuple(s((d, hidden), dtype) for _ in range(arity))
    return s((tokens, d), dtype), ws, s((hidden, d_out), dtype)


@pytest.mark.parametrize(
    ("dtype", "shape", "reason"),
    [
        ("float32", {}, "float32 is not served by the Mosaic GPU kernels"),
        ("bfloat16", {"d": 96}, "d=96 is not a multiple of 64"),
        ("bfloat16", {"d_out": 32}, "d_out=32 is not a multiple of 64"),
        ("bfloat16", {"hidden": 192}, "hidden=192 is not a multiple of 128"),
        ("float64", {}, "float64 is not a kernel dtype"),
    ],
)
def test_support_names_why_the_mosaic_gpu_kernels_cannot_serve_a_call(dtype, shape, reason):
    x, ws, w_out = _specs(dtype, **shape)
    support = kernels.ffn_support(x, ws, w_out, implementation="interpret", backend="gpu")
    assert support.implementation == "xla" and reason in support.reason


def test_support_serves_what_the_mosaic_gpu_kernels_take():
    x, ws, w_out = _specs("bfloat16", hidden=192, arity=2)  # gated tiles are 64 wide
    assert kernels.ffn_support(x, ws, w_out, implementation="interpret", backend="gpu") == (
        "interpret",
        None,
    )
    assert kernels.ffn_support(x, ws, w_out, implementation="xla") == ("xla", None)

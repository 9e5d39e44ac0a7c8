"""The fused FFN kernels agree with the pure-jnp reference, forward and backward.

`TestFFNKernel` runs the compiled Pallas path and skips without a GPU/TPU;
`TestFFNKernelInterpret` (`INTERPRET = True`) runs the same checks on CPU in interpret mode
(Pallas' own `gpu_ops_test.py` pattern).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from tests.kernels.helpers import Problem, assert_close, scan_loss, tolerance
from tests.kernels.strategies import block_ms, problems


class TestFFNKernel:
    """Compiled Pallas kernels (Mosaic GPU on Hopper, Mosaic TPU) against the reference."""

    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
            pytest.skip("compiled Pallas kernels need a GPU or TPU; TestFFNKernelInterpret runs "
                        "the same checks on CPU in interpret mode")

    def kw(self, **extra):
        impl = "interpret" if self.INTERPRET else "pallas"
        return {"implementation": impl, **extra}

    def dtypes(self):
        # The compiled GPU kernels take bf16/f16 (f32 falls back); interpret checks all three.
        if not self.INTERPRET and jax.default_backend() == "gpu":
            return ("bfloat16", "float16")
        return ("float32", "bfloat16", "float16")

    @given(data=problems(), block_m=block_ms)
    def test_forward_matches_reference(self, data, block_m):
        assume(data.dtype in self.dtypes())
        params, x = data.params(), data.x()
        out = jax.jit(lambda p, x: data.apply(p, x, **self.kw(block_m=block_m,
                                                                 block_h=128)))(params, x)
        ref = data.apply(params, x, reference=True)
        assert out.dtype == ref.dtype == jnp.dtype(data.dtype)
        assert_close(out, ref, tolerance(data.dtype, grad=False, compiled=not self.INTERPRET))

    @settings(max_examples=8)
    @given(data=problems(), block_m=block_ms, n=st.integers(1, 3))
    def test_all_gradients_through_scan_match_reference(self, data, block_m, n):
        assume(data.dtype in self.dtypes())
        params, x = data.params(), data.x()
        loss = scan_loss(data, n, **self.kw(block_m=block_m, block_h=128))
        ref_loss = scan_loss(data, n, reference=True)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        ref_grads = jax.grad(ref_loss, argnums=(0, 1))(params, x)
        tol = tolerance(data.dtype, grad=True, compiled=not self.INTERPRET)
        names = ["x"] + [k for k, v in sorted(params.items()) if v is not None]
        flat = jax.tree.leaves(grads[1]) + jax.tree.leaves(grads[0])
        ref_flat = jax.tree.leaves(ref_grads[1]) + jax.tree.leaves(ref_grads[0])
        assert len(flat) == len(names)
        for name, g, r in zip(names, flat, ref_flat, strict=True):
            assert g.dtype == jnp.float32  # weights are float32 masters, cast inside the body
            assert_close(g, r, tol, f"d loss / d {name}")

    def test_nan_and_inf_inputs_propagate_like_the_reference(self):
        data = Problem(48, 16, 200, "float32", "gelu", False, True, 3)
        params, x = data.params(), data.x()
        x = x.at[5, 2].set(jnp.nan).at[17, 0].set(jnp.inf)
        out = data.apply(params, x, **self.kw(block_m=16, block_h=128))
        ref = data.apply(params, x, reference=True)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
        assert np.isnan(out[5]).all()
        grads = jax.grad(lambda p: jnp.sum(data.apply(p, x, **self.kw(block_m=16))))(params)
        ref_grads = jax.grad(lambda p: jnp.sum(data.apply(p, x, reference=True)))(params)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_array_equal(np.isfinite(g), np.isfinite(r))

    def test_leading_batch_axes_are_flattened_to_tokens(self):
        data = Problem(24, 16, 64, "float32", "relu", False, True, 4)
        params = data.params()
        x = jax.random.normal(jax.random.key(9), (2, 3, 4, 16))
        out = data.apply(params, x, **self.kw())
        flat = data.apply(params, x.reshape(24, 16), reference=True)
        assert out.shape == (2, 3, 4, 16)
        assert_close(out.reshape(24, 16), flat, tolerance("float32", grad=False))

    def test_vmap_over_inputs_matches_reference(self):
        data = Problem(16, 8, 40, "float32", "silu", True, False, 5)
        params = data.params()
        xs = jax.random.normal(jax.random.key(1), (3, 16, 8))
        out = jax.vmap(lambda x: data.apply(params, x, **self.kw()))(xs)
        ref = jax.vmap(lambda x: data.apply(params, x, reference=True))(xs)
        assert_close(out, ref, tolerance("float32", grad=False))


class TestFFNKernelInterpret(TestFFNKernel):
    """The same checks on CPU: TPU-style kernels under Pallas' generic interpreter."""

    INTERPRET = True

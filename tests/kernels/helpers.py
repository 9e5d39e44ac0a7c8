"""Shared helpers for the kernel suites: tolerances, problem construction, a scan'd loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tietransform import kernels


# Kernel vs reference, as max|kernel - reference| / max|reference| (both in float32):
# - float32 on CPU: both sides accumulate in float32 in a different order (blocks, chunks), so
#   they agree to a few ulps of the largest entry; 1e-5 leaves room for n scan iterations.
# - float32 compiled on an accelerator: TF32/bf16-pass matmuls round inputs to ~11 bits: 2e-3.
# - bfloat16 (8-bit mantissa, ulp 2^-8 = 3.9e-3): the kernel rounds the hidden activation and
#   dz to bf16 at different points than the reference's autodiff does; a few ulps: 2e-2 forward,
#   5e-2 for gradients (two more rounded matmuls).
# - float16 (11-bit mantissa) the same argument with 8x smaller ulps, at the same tolerances.
_FORWARD_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}
_GRAD_TOL = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-2}
_COMPILED_F32_TOL = 2e-3


def tolerance(dtype, *, grad: bool, compiled: bool = False) -> float:
    """Relative tolerance (to the reference's largest entry) for a kernel result in `dtype`."""
    name = jnp.dtype(dtype).name
    if compiled and name == "float32":
        return _COMPILED_F32_TOL
    return (_GRAD_TOL if grad else _FORWARD_TOL)[name]


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """Assert `max|actual - expected| <= tol * max(max|expected|, 1e-6)`, in float32."""
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "user_lambda": lambda z: z * jnp.sin(z),
    # Nonzero at 0, so a zero-filled padding row or column is not inert unless it is masked.
    "cos": jnp.cos,
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One FFN call: sizes, dtype, hidden function, biases, and how to build its arrays."""

    tokens: int
    d: int
    hidden: int
    dtype: str
    activation: str
    gated: bool
    biases: bool
    seed: int

    def params(self) -> dict[str, jax.Array | None]:
        """Float32 master parameters (cast to `dtype` inside the step, as a user would)."""
        ks = jax.random.split(jax.random.key(self.seed), 7)
        d, h = self.d, self.hidden
        normal = jax.random.normal
        p: dict[str, jax.Array | None] = {
            "w1": normal(ks[0], (d, h)) / np.sqrt(d),
            "w2": normal(ks[1], (h, d)) / np.sqrt(h),
            "b1": normal(ks[2], (h,)) * 0.5 if self.biases else None,
            "b2": normal(ks[3], (d,)) * 0.5 if self.biases else None,
        }
        if self.gated:
            p["wu"] = normal(ks[4], (d, h)) / np.sqrt(d)
            p["bu"] = normal(ks[5], (h,)) * 0.5 if self.biases else None
        return p

    def x(self) -> jax.Array:
        return jax.random.normal(jax.random.key(self.seed + 1), (self.tokens, self.d))

    def apply(self, params, x, **kwargs) -> jax.Array:
        """The FFN on `x`, parameters cast to `dtype`; `kwargs` go to `ffn`/`gated_ffn` (or the
        reference when `kwargs` is `{"reference": True}`)."""
        dt = jnp.dtype(self.dtype)
        c = {k: (None if v is None else v.astype(dt)) for k, v in params.items()}
        x = x.astype(dt)
        act = ACTIVATIONS[self.activation]
        reference = kwargs.pop("reference", False)
        if self.gated:
            fn = kernels.gated_ffn_reference if reference else kernels.gated_ffn
            return fn(
                x,
                c["w1"],
                c["wu"],
                c["w2"],
                bg=c["b1"],
                bu=c["bu"],
                b2=c["b2"],
                activation=act,
                **kwargs,
            )
        fn = kernels.ffn_reference if reference else kernels.ffn
        return fn(x, c["w1"], c["b1"], c["w2"], c["b2"], activation=act, **kwargs)


def scan_loss(problem: Problem, n: int, *, aux: bool = False, **kwargs) -> Callable:
    """`loss(params, x)`: `n` residual iterations `x <- x + ffn(x)` of one shared FFN in a
    `lax.scan` (weights are loop-invariant consts, cast inside the body), then a fixed
    random projection of the result. With `aux=True` it returns `(loss, result)`."""
    cot = jax.random.normal(jax.random.key(problem.seed + 2), (problem.tokens, problem.d))

    def loss(params, x):
        def body(carry, _):
            y = problem.apply(params, carry, **dict(kwargs))
            return carry + y.astype(jnp.float32), None

        out, _ = lax.scan(body, x, None, length=n)
        return (jnp.sum(out * cot), out) if aux else jnp.sum(out * cot)

    return loss

"""Pure-jnp references: what every kernel is tested against, and the `"xla"` fallback."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._problem import Activation, Gated, Hidden, HiddenFn


__all__ = ["ffn_reference", "gated_ffn_reference", "problem_reference", "problem_reference_remat"]

_F32 = jnp.float32


def problem_reference(
    phi: HiddenFn,
    x: Float[Array, "tokens d"],
    ws: Sequence[Float[Array, "d hidden"]],
    bs: Sequence[Float[Array, " hidden"] | None],
    w_out: Float[Array, "hidden d_out"],
    b_out: Float[Array, " d_out"] | None,
) -> Float[Array, "tokens d_out"]:
    """`phi(x @ ws[0] + bs[0], ...) @ w_out + b_out` with the numerics of `kernels.ffn._problem`."""
    zs = []
    for w, b in zip(ws, bs, strict=True):
        z = jnp.dot(x, w, preferred_element_type=_F32)
        zs.append(z if b is None else z + b.astype(_F32)[None, :])
    h = phi(*zs).astype(x.dtype)
    out = jnp.dot(h, w_out, preferred_element_type=_F32)
    if b_out is not None:
        out = out + b_out.astype(_F32)[None, :]
    return out.astype(x.dtype)


problem_reference_remat = jax.checkpoint(problem_reference, static_argnums=(0,))
"""`problem_reference` under `jax.checkpoint`: saves its inputs, recomputes in the backward."""


def ffn_reference(
    x: Float[Array, "*batch d"],
    w1: Float[Array, "d hidden"],
    b1: Float[Array, " hidden"] | None,
    w2: Float[Array, "hidden d_out"],
    b2: Float[Array, " d_out"] | None,
    *,
    activation: Activation = jax.nn.gelu,
    remat: bool = False,
) -> Float[Array, "*batch d_out"]:
    """The FFN `activation(x @ w1 + b1) @ w2 + b2` in plain jnp.

    Accumulates in float32, evaluates the activation in float32 and rounds the hidden activation
    to `x.dtype` before the second matmul (the contract every kernel meets). With `remat=True`
    the function is wrapped in `jax.checkpoint` (the memory baseline a kernel must beat).
    """
    fn = problem_reference_remat if remat else problem_reference
    lead = x.shape[:-1]
    out = fn(Hidden(activation), x.reshape(-1, x.shape[-1]), (w1,), (b1,), w2, b2)
    return out.reshape(*lead, w2.shape[1])


def gated_ffn_reference(
    x: Float[Array, "*batch d"],
    wg: Float[Array, "d hidden"],
    wu: Float[Array, "d hidden"],
    w2: Float[Array, "hidden d_out"],
    *,
    bg: Float[Array, " hidden"] | None = None,
    bu: Float[Array, " hidden"] | None = None,
    b2: Float[Array, " d_out"] | None = None,
    activation: Activation = jax.nn.silu,
    remat: bool = False,
) -> Float[Array, "*batch d_out"]:
    """The gated FFN `(activation(x @ wg + bg) * (x @ wu + bu)) @ w2 + b2` in plain jnp."""
    fn = problem_reference_remat if remat else problem_reference
    lead = x.shape[:-1]
    out = fn(Gated(activation), x.reshape(-1, x.shape[-1]), (wg, wu), (bg, bu), w2, b2)
    return out.reshape(*lead, w2.shape[1])

"""The blockwise math every Pallas backend runs: one token block x one hidden chunk at a time.

These functions take and return values (not refs), so the TPU-style `pallas_call` kernels (run by
the generic and the TPU interpreters on CPU) and the Mosaic GPU kernel epilogues all evaluate the
same recomputation, the same masking of padded rows/columns and the same `jax.vjp` of `phi`.
All matmuls accumulate in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from .. import _compat
from ._problem import HiddenFn


__all__ = ["hidden", "hidden_and_dz", "mm", "mm_nt", "mm_tn", "preactivations", "valid_mask"]

_F32 = jnp.float32


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b`, `(m, k) x (k, n) -> (m, n)` float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def mm_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b.T`, `(m, k) x (n, k) -> (m, n)` float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def mm_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a.T @ b`, `(k, m) x (k, n) -> (m, n)` float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def valid_mask(
    row0: jax.Array, rows: int, n_rows: int, col0: jax.Array, cols: int, n_cols: int
) -> jax.Array | None:
    """Which entries of a `(rows, cols)` block at `(row0, col0)` lie inside `(n_rows, n_cols)`.

    `None` when the caller knows nothing was padded (`n_rows`/`n_cols` passed as 0 then).
    """
    mask = None
    if n_rows:
        r = row0 + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
        mask = r < n_rows
    if n_cols:
        c = col0 + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
        mask = c < n_cols if mask is None else mask & (c < n_cols)
    return mask


def preactivations(
    x: jax.Array, ws: Sequence[jax.Array], bs: Sequence[jax.Array | None]
) -> tuple[jax.Array, ...]:
    """`x @ w + b` for each input projection, float32. `b` blocks are `(1, hidden_chunk)`."""
    zs = []
    for w, b in zip(ws, bs, strict=True):
        z = mm(x, w)
        zs.append(z if b is None else z + b.astype(_F32))
    return tuple(zs)


def _masked(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, jnp.zeros_like(v))


def hidden(phi: HiddenFn, zs: Sequence[jax.Array], mask: jax.Array | None) -> jax.Array:
    """`phi(*zs)` in float32, zero outside `mask` (padding must not leak into the output)."""
    return _masked(phi(*zs), mask)


def _h_and_pullback(phi: HiddenFn, dh: jax.Array, *zs: jax.Array):
    h, pullback = jax.vjp(phi, *zs)
    return (h, *pullback(dh))


def hidden_and_dz(
    phi: HiddenFn,
    zs: Sequence[jax.Array],
    dh: jax.Array,
    mask: jax.Array | None,
    *,
    plain_adds: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The recomputed hidden activation `phi(*zs)` and the pre-activation cotangents.

    `dh` is the cotangent of the hidden activation (float32); the cotangents are `phi`'s
    `jax.vjp` at `zs`. Both results are zero outside `mask`, so padded rows/columns add nothing
    to any weight gradient even where `phi'` is not finite at the padding value.
    `plain_adds=True` evaluates the same jaxpr with `add_any` bound as `add` (for backends,
    like Mosaic GPU, that lower only the latter).
    """
    fn = functools.partial(_h_and_pullback, phi)
    if plain_adds:
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (dh, *zs)]
        h, *dzs = _compat.eval_with_plain_adds(jax.make_jaxpr(fn)(*avals), dh, *zs)
    else:
        h, *dzs = fn(dh, *zs)
    return _masked(h, mask), tuple(_masked(dz, mask) for dz in dzs)

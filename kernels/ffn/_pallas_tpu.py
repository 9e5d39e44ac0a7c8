"""TPU-style Pallas kernels (`pallas_call` with a grid and BlockSpecs).

Compiled by Mosaic TPU on TPU; on CPU run by Pallas' generic interpreter (`interpret=True`) or by
the TPU interpreter (`pltpu.InterpretParams`, which also detects races).

- forward: grid `(token blocks, hidden chunks)`; the output block stays resident across the
  hidden axis and accumulates `phi(x W + b) @ W_out` in float32.
- dX: the same grid; recomputes the pre-activations and `dh = g @ W_out^T` per chunk and
  accumulates `dz @ W^T`.
- dW: grid `(hidden chunks, token blocks)`; the weight-gradient blocks of one hidden chunk stay
  resident while the token blocks stream past (no atomics, as flash attention's dK/dV).

Backward: 7 GEMM-equivalents for a plain FFN (z and dh are recomputed by both kernels), and no
tensor larger than a block besides the inputs and the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat
from . import _math
from ._blocking import Blocks, pad_axis
from ._problem import HiddenFn


__all__ = ["backward", "forward", "tpu_blocks"]

_F32 = jnp.float32


def tpu_blocks(tokens: int, hidden: int, dtype: jnp.dtype, block_m: int | None,
               block_h: int | None) -> Blocks:
    """Blocks for these kernels: rows a multiple of the sublane tiling, chunks of 128 lanes."""
    m_align = 8 * (4 // jnp.dtype(dtype).itemsize)
    return Blocks.choose(tokens, hidden, block_m=block_m or 256, block_h=block_h or 512,
                         m_align=m_align, h_align=128)


def _pad_inputs(blocks: Blocks, x, ws, bs, w_out):
    mp, hp = blocks.padded_tokens, blocks.padded_hidden
    x = pad_axis(x, 0, mp)
    ws = tuple(pad_axis(w, 1, hp) for w in ws)
    bs = tuple(None if b is None else pad_axis(b.reshape(1, -1), 1, hp) for b in bs)
    return x, ws, bs, pad_axis(w_out, 0, hp)


def _split(refs: Sequence[Any], k: int, has_b: Sequence[bool]):
    """Split `(W_1..W_k, b_i for present biases, rest...)` refs."""
    ws, rest = list(refs[:k]), list(refs[k:])
    bs = [rest.pop(0) if present else None for present in has_b]
    return ws, bs, rest


def _load(ref):
    return None if ref is None else ref[...]


def _call(kernel, *, grid, in_specs, out_specs, out_shape, semantics, interpret, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.tpu_compiler_params(semantics),
        interpret=interpret,
        name=name,
    )


def forward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, *, interpret: Any = False):
    """`phi(x W + b) @ W_out + b_out` for `x` of shape `(tokens, d)`; returns `x.dtype`."""
    k, bm, bh = len(ws), blocks.block_m, blocks.block_h
    d, d_out = x.shape[1], w_out.shape[1]
    has_b = tuple(b is not None for b in bs)
    xp, wsp, bsp, w_outp = _pad_inputs(blocks, x, ws, bs, w_out)

    def kernel(x_ref, *refs):
        w_refs, b_refs, (w_out_ref, out_ref) = _split(refs, k, has_b)
        i, j = pl.program_id(0), pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            out_ref[...] = jnp.zeros_like(out_ref)

        xb = x_ref[...]
        zs = _math.preactivations(xb, [r[...] for r in w_refs], [_load(r) for r in b_refs])
        mask = _math.valid_mask(i * bm, bm, 0, j * bh, bh, blocks.mask_cols)
        h = _math.hidden(phi, zs, mask).astype(xb.dtype)
        out_ref[...] += _math.mm(h, w_out_ref[...])

    in_specs = [
        pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
        *[pl.BlockSpec((d, bh), lambda i, j: (0, j)) for _ in ws],
        *[pl.BlockSpec((1, bh), lambda i, j: (0, j)) for b in bsp if b is not None],
        pl.BlockSpec((bh, d_out), lambda i, j: (j, 0)),
    ]
    out = _call(
        kernel,
        grid=(blocks.grid_m, blocks.grid_h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, d_out), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((blocks.padded_tokens, d_out), _F32),
        semantics=("parallel", "arbitrary"),
        interpret=interpret,
        name="ffn_forward",
    )(xp, *wsp, *[b for b in bsp if b is not None], w_outp)
    out = out[: blocks.tokens]
    if b_out is not None:
        out = out + b_out.astype(_F32)[None, :]
    return out.astype(x.dtype)


def _recompute(phi, blocks, i, j, x_ref, g_ref, w_refs, b_refs, w_out_ref):
    """Recompute one `(token block i, hidden chunk j)` tile: `x`, `g`, `h`, the `dz`s (masked)."""
    bm, bh = blocks.block_m, blocks.block_h
    xb, gb = x_ref[...], g_ref[...]
    zs = _math.preactivations(xb, [r[...] for r in w_refs], [_load(r) for r in b_refs])
    dh = _math.mm_nt(gb, w_out_ref[...])
    mask = _math.valid_mask(i * bm, bm, blocks.mask_rows, j * bh, bh, blocks.mask_cols)
    h, dzs = _math.hidden_and_dz(phi, zs, dh, mask)
    return xb, gb, h, dzs


def backward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, g, *, interpret: Any = False):
    """Cotangents `(dx, dws, dbs, dw_out, db_out)` of `forward` at `g`, recomputing `h` blockwise.

    Returned in the dtypes of the corresponding inputs (`None` for absent biases).
    """
    k, bm, bh = len(ws), blocks.block_m, blocks.block_h
    d, d_out = x.shape[1], w_out.shape[1]
    has_b = tuple(b is not None for b in bs)
    xp, wsp, bsp, w_outp = _pad_inputs(blocks, x, ws, bs, w_out)
    gp = pad_axis(g, 0, blocks.padded_tokens)
    bsp_present = [b for b in bsp if b is not None]
    operands = (xp, gp, *wsp, *bsp_present, w_outp)

    # dX: grid (token blocks i, hidden chunks j), dx block resident across j.
    def dx_kernel(x_ref, g_ref, *refs):
        w_refs, b_refs, (w_out_ref, dx_ref) = _split(refs, k, has_b)
        i, j = pl.program_id(0), pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            dx_ref[...] = jnp.zeros_like(dx_ref)

        xb, _, _, dzs = _recompute(phi, blocks, i, j, x_ref, g_ref, w_refs, b_refs, w_out_ref)
        for dz, w_ref in zip(dzs, w_refs, strict=True):
            dx_ref[...] += _math.mm_nt(dz.astype(xb.dtype), w_ref[...])

    dx = _call(
        dx_kernel,
        grid=(blocks.grid_m, blocks.grid_h),
        in_specs=[
            pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, d_out), lambda i, j: (i, 0)),
            *[pl.BlockSpec((d, bh), lambda i, j: (0, j)) for _ in ws],
            *[pl.BlockSpec((1, bh), lambda i, j: (0, j)) for _ in bsp_present],
            pl.BlockSpec((bh, d_out), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((blocks.padded_tokens, d), _F32),
        semantics=("parallel", "arbitrary"),
        interpret=interpret,
        name="ffn_backward_dx",
    )(*operands)

    # dW: grid (hidden chunks j, token blocks i), weight-gradient blocks resident across i.
    def dw_kernel(x_ref, g_ref, *refs):
        w_refs, b_refs, rest = _split(refs, k, has_b)
        w_out_ref, out_refs = rest[0], rest[1:]
        dw_refs = out_refs[:k]
        db_refs = out_refs[k : k + sum(has_b)]
        dw_out_ref = out_refs[-1]
        j, i = pl.program_id(0), pl.program_id(1)

        @pl.when(i == 0)
        def _init():
            for r in out_refs:
                r[...] = jnp.zeros_like(r)

        xb, gb, h, dzs = _recompute(phi, blocks, i, j, x_ref, g_ref, w_refs, b_refs, w_out_ref)
        for dz, dw_ref in zip(dzs, dw_refs, strict=True):
            dw_ref[...] += _math.mm_tn(xb, dz.astype(xb.dtype))
        for dz, db_ref in zip([dz for dz, p in zip(dzs, has_b, strict=True) if p], db_refs,
                              strict=True):
            db_ref[...] += jnp.sum(dz, axis=0, keepdims=True)
        dw_out_ref[...] += _math.mm_tn(h.astype(xb.dtype), gb)

    hp = blocks.padded_hidden
    grads = _call(
        dw_kernel,
        grid=(blocks.grid_h, blocks.grid_m),
        in_specs=[
            pl.BlockSpec((bm, d), lambda j, i: (i, 0)),
            pl.BlockSpec((bm, d_out), lambda j, i: (i, 0)),
            *[pl.BlockSpec((d, bh), lambda j, i: (0, j)) for _ in ws],
            *[pl.BlockSpec((1, bh), lambda j, i: (0, j)) for _ in bsp_present],
            pl.BlockSpec((bh, d_out), lambda j, i: (j, 0)),
        ],
        out_specs=[
            *[pl.BlockSpec((d, bh), lambda j, i: (0, j)) for _ in ws],
            *[pl.BlockSpec((1, bh), lambda j, i: (0, j)) for _ in bsp_present],
            pl.BlockSpec((bh, d_out), lambda j, i: (j, 0)),
        ],
        out_shape=[
            *[jax.ShapeDtypeStruct((d, hp), _F32) for _ in ws],
            *[jax.ShapeDtypeStruct((1, hp), _F32) for _ in bsp_present],
            jax.ShapeDtypeStruct((hp, d_out), _F32),
        ],
        semantics=("parallel", "arbitrary"),
        interpret=interpret,
        name="ffn_backward_dw",
    )(*operands)
    return finish_backward(blocks, x, ws, bs, w_out, b_out, g, dx, grads[:k], grads[k:-1],
                           grads[-1])


def finish_backward(blocks, x, ws, bs, w_out, b_out, g, dx, dws, dbs_present, dw_out):
    """Slice off padding, add `db_out = sum(g)`, and cast every cotangent to its input's dtype."""
    h = blocks.hidden
    dbs_iter = iter(dbs_present)
    dbs = tuple(None if b is None else next(dbs_iter)[0, :h].astype(b.dtype) for b in bs)
    db_out = None if b_out is None else jnp.sum(g, axis=0, dtype=_F32).astype(b_out.dtype)
    return (
        dx[: blocks.tokens].astype(x.dtype),
        tuple(dw[:, :h].astype(w.dtype) for dw, w in zip(dws, ws, strict=True)),
        dbs,
        dw_out[:h].astype(w_out.dtype),
        db_out,
    )




def interpret_params():
    """`interpret=` for running these kernels under the TPU interpreter on CPU."""
    return _compat.tpu_interpret_params()

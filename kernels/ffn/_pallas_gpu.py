"""Mosaic GPU kernels (`plgpu.kernel`, Hopper WGMMA) for the fused FFN.

A fully fused backward would keep a `(block_m, d)` float32 accumulator on chip; at `d = 1024`
that is 256 KiB per 64-row block, more than a Hopper SM's register file. So the GPU path fuses
what can be fused and streams the hidden axis in chunks of `chunk` columns (a `lax.scan`, so
only one chunk's activations are ever alive):

- `hidden kernel` (forward): tiles `(block_m, block_n)` of `h = phi(x W + b)`; `out += h W_out`.
- `recompute kernel` (backward): per tile, `z = x W + b` and `dh = g W_out^T` in WGMMA
  accumulators, then the shared epilogue `kernels.ffn._math.hidden_and_dz` writes `h`, `dz`;
  `dW = x^T dz`, `db = sum dz`, `dW_out = h^T g`, `dx += dz W^T` follow as plain matmuls.

That is 5 GEMM-equivalents in the backward for a plain FFN (the minimum), no `n x tokens x
hidden` residuals, and `tokens x chunk` of transient memory.
On CPU the same kernels run under Pallas' Mosaic GPU interpreter (`InterpretGPUParams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .. import _compat
from . import _math
from ._blocking import Blocks, pad_axis, round_up
from ._problem import HiddenFn


__all__ = ["backward", "check_supported", "forward", "gpu_blocks", "interpret_params"]

_F32 = jnp.float32
_SWIZZLE = 128  # bytes; a K-block of one 128-byte swizzle row (64 bf16/f16 elements).
_BLOCK_M = 64  # one warpgroup's WGMMA M.
_DEFAULT_CHUNK = 1024


def interpret_params() -> Any:
    """`interpret=` that runs these kernels under the Mosaic GPU interpreter on CPU."""
    return _compat.gpu_interpret_params()


def _block_k(dtype) -> int:
    return _SWIZZLE // jnp.dtype(dtype).itemsize


def _transforms(dtype) -> tuple[Any, ...]:
    return (plgpu.TilingTransform((8, _block_k(dtype))), plgpu.SwizzleTransform(_SWIZZLE))


def _block_n(arity: int) -> int:
    # One float32 WGMMA accumulator of (64, block_n) costs block_n / 2 registers per thread;
    # the recompute kernel holds arity + 1 of them.
    return 128 if arity == 1 else 64


def check_supported(
    x: jax.Array, ws: Sequence[jax.Array], w_out: jax.Array, *, compiled: bool
) -> None:
    """Raise `NotImplementedError` (with the reason) for calls these kernels cannot serve."""
    dtype = jnp.dtype(x.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(
            f"{dtype.name} is not served by the Mosaic GPU kernels (they take bfloat16/float16)"
        )
    bk, bn = _block_k(dtype), _block_n(len(ws))
    d, hidden, d_out = x.shape[1], ws[0].shape[1], w_out.shape[1]
    for name, size, mult in (("d", d, bk), ("d_out", d_out, bk), ("hidden", hidden, bn)):
        if size % mult:
            raise NotImplementedError(f"{name}={size} is not a multiple of {mult}")
    if compiled:
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        if float(cc) < 9.0:
            raise NotImplementedError(f"WGMMA needs an sm_90 (Hopper) GPU, found sm_{cc}")


def gpu_blocks(
    tokens: int,
    hidden: int,
    arity: int,
    block_m: int | None,
    block_h: int | None,
    *,
    compiled: bool = False,
) -> Blocks:
    """Token blocks of `block_m` rows (64 by default) and hidden chunks of `block_h` columns.

    The chunk is the largest multiple of the tile width (128, 64 gated) that divides `hidden` and
    is at most `block_h` (but at least one tile). Compiled kernels round `block_m` up to a
    multiple of 64, the M of one warpgroup's WGMMA (Mosaic GPU rejects any other accumulator
    height); the interpreter takes any `block_m`.
    """
    bn = _block_n(arity)
    chunk = max(min(block_h or _DEFAULT_CHUNK, hidden) // bn * bn, bn)
    while hidden % chunk:
        chunk -= bn
    bm = block_m or _BLOCK_M
    if compiled:
        bm = min(round_up(bm, _BLOCK_M), round_up(tokens, _BLOCK_M))
    return Blocks(tokens, hidden, bm, chunk)


def _tile_gemm(acc_ref, a_gmem, b_gmem, mi, ni, bm: int, bn: int):
    """`acc += a[mi block, :] @ b[:, ni block]`, pipelined over K through swizzled SMEM."""
    dtype = a_gmem.dtype
    bk, tr = _block_k(dtype), _transforms(dtype)

    def step(_, a_smem, b_smem):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        plgpu.wgmma_wait(0)

    plgpu.emit_pipeline(
        step,
        grid=(a_gmem.shape[1] // bk,),
        in_specs=[
            plgpu.BlockSpec((bm, bk), lambda kk: (mi, kk), transforms=tr),
            plgpu.BlockSpec((bk, bn), lambda kk: (kk, ni), transforms=tr),
        ],
        max_concurrent_steps=2,
    )(a_gmem, b_gmem)


def _tiles_kernel(
    epilogue,
    operands,
    n_gemms: int,
    n_bias: int,
    n_out: int,
    rows: int,
    cols: int,
    bm: int,
    bn: int,
    interpret: Any,
):
    """One `plgpu.kernel` over `(rows/bm, cols/bn)` tiles.

    `operands = (a_1, b_1, ..., a_g, b_g, bias_1, ..., bias_q)`; the tile computes the float32
    accumulators `a_i @ b_i`, adds bias `i` to
    accumulator `i`, and stores `epilogue(*accumulators)` (`n_out` arrays) to `(rows, cols)`.
    """
    dtype = operands[0].dtype
    tr = _transforms(dtype)

    def body(*refs):
        ins, outs, scratch = (
            refs[: len(operands)],
            refs[len(operands) : len(operands) + n_out],
            refs[len(operands) + n_out :],
        )
        out_smems, bias_smems, barrier = scratch[:n_out], scratch[n_out:-1], scratch[-1]
        mi, ni = lax.axis_index("m"), lax.axis_index("n")
        accs = []
        for g in range(n_gemms):
            a_gmem, b_gmem = ins[2 * g], ins[2 * g + 1]

            def scope(acc_ref, a_gmem=a_gmem, b_gmem=b_gmem, g=g):
                _tile_gemm(acc_ref, a_gmem, b_gmem, mi, ni, bm, bn)
                return acc_ref[...]

            accs.append(pl.run_scoped(scope, plgpu.ACC((bm, bn), _F32)))
        for q in range(n_bias):
            plgpu.copy_gmem_to_smem(
                ins[2 * n_gemms + q].at[pl.ds(ni * bn, bn)], bias_smems[q], barrier.at[q]
            )
            plgpu.barrier_wait(barrier.at[q])
            b = _compat.gpu_layout_cast(bias_smems[q][...], plgpu.Layout.WGMMA.reduce(0), interpret)
            accs[q] = accs[q] + lax.broadcast_in_dim(b.astype(_F32), (bm, bn), (1,))
        results = epilogue(*accs)
        for value, o_smem, o_gmem in zip(results, out_smems, outs, strict=True):
            o_smem[...] = value.astype(o_smem.dtype)
        plgpu.commit_smem()
        for o_smem, o_gmem in zip(out_smems, outs, strict=True):
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        *[plgpu.SMEM((bm, bn), dtype, transforms=tr) for _ in range(n_out)],
        *[plgpu.SMEM((bn,), dtype) for _ in range(n_bias)],
        plgpu.Barrier(num_barriers=max(n_bias, 1)),
    ]
    kwargs = {} if interpret is False else {"interpret": interpret}
    return plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct((rows, cols), dtype) for _ in range(n_out)],
        scratch_types=scratch,
        grid=(rows // bm, cols // bn),
        grid_names=("m", "n"),
        **kwargs,
    )(*operands)


def _with_bias_first(ws, bs):
    """Reorder projections so that those with a bias come first (bias q goes to accumulator q);
    returns the order and its inverse."""
    order = sorted(range(len(ws)), key=lambda i: bs[i] is None)
    inverse = [order.index(i) for i in range(len(ws))]
    return order, inverse


def _hidden_chunk(phi, xp, ws_c, bs_c, bm, bn, interpret):
    """`h = phi(x W_c + b_c)` for one hidden chunk, `(padded tokens, chunk)` in `x.dtype`."""
    order, inverse = _with_bias_first(ws_c, bs_c)
    pairs = [a for i in order for a in (xp, ws_c[i])]
    biases = [bs_c[i] for i in order if bs_c[i] is not None]

    def epilogue(*zs):
        return (_math.hidden(phi, [zs[j] for j in inverse], None),)

    (h,) = _tiles_kernel(
        epilogue,
        (*pairs, *biases),
        len(ws_c),
        len(biases),
        1,
        xp.shape[0],
        ws_c[0].shape[1],
        bm,
        bn,
        interpret,
    )
    return h


def _recompute_chunk(phi, xp, gp, ws_c, bs_c, w_out_t_c, bm, bn, interpret):
    """`(h, dz_1, ..., dz_k)` for one hidden chunk, each `(padded tokens, chunk)`.

    `w_out_t_c` is the chunk of `W_out^T`, `(d_out, chunk)`, so `dh = g @ w_out_t_c`.
    """
    order, inverse = _with_bias_first(ws_c, bs_c)
    k = len(ws_c)
    pairs = [a for i in order for a in (xp, ws_c[i])] + [gp, w_out_t_c]
    biases = [bs_c[i] for i in order if bs_c[i] is not None]

    def epilogue(*accs):
        zs, dh = [accs[j] for j in inverse], accs[k]
        h, dzs = _math.hidden_and_dz(phi, zs, dh, None, plain_adds=True)
        return (h, *dzs)

    return _tiles_kernel(
        epilogue,
        (*pairs, *biases),
        k + 1,
        len(biases),
        k + 1,
        xp.shape[0],
        ws_c[0].shape[1],
        bm,
        bn,
        interpret,
    )


def _chunk(blocks: Blocks, j, ws, bs, w_out):
    """Hidden chunk `j` of the weights: `(d, chunk)`, `(chunk,)`, `(chunk, d_out)` slices, so a
    `lax.scan` over chunk indices keeps one chunk's activations (and weights) alive at a time."""
    c = blocks.block_h
    ws_c = tuple(lax.dynamic_slice_in_dim(w, j * c, c, axis=1) for w in ws)
    bs_c = tuple(None if b is None else lax.dynamic_slice_in_dim(b, j * c, c) for b in bs)
    return ws_c, bs_c, lax.dynamic_slice_in_dim(w_out, j * c, c, axis=0)


def _chunk_ids(blocks: Blocks) -> jax.Array:
    return jnp.arange(blocks.hidden // blocks.block_h, dtype=jnp.int32)


def forward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, *, interpret: Any = False):
    """`phi(x W + b) @ W_out + b_out` for `x` of shape `(tokens, d)`; returns `x.dtype`."""
    bm, bn, m = blocks.block_m, _block_n(len(ws)), blocks.tokens
    xp = pad_axis(x, 0, blocks.padded_tokens)

    def chunk_step(out, j):
        ws_c, bs_c, w_out_c = _chunk(blocks, j, ws, bs, w_out)
        h = _hidden_chunk(phi, xp, ws_c, bs_c, bm, bn, interpret)[:m]
        return out + _math.mm(h, w_out_c), None

    out0 = jnp.zeros((m, w_out.shape[1]), _F32)
    if b_out is not None:
        out0 = out0 + b_out.astype(_F32)[None, :]
    out, _ = lax.scan(chunk_step, out0, _chunk_ids(blocks))
    return out.astype(x.dtype)


def backward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, g, *, interpret: Any = False):
    """Cotangents `(dx, dws, dbs, dw_out, db_out)` of `forward` at `g`, one hidden chunk at a
    time; in the dtypes of the corresponding inputs.

    `dW_i` chunks are written in place into a `(d, hidden)` scan carry (no stacked copy to
    transpose); `db_i` and `dW_out` chunks stack along the hidden axis as they are.
    """
    bm, bn, m, c = blocks.block_m, _block_n(len(ws)), blocks.tokens, blocks.block_h
    xp, gp = pad_axis(x, 0, blocks.padded_tokens), pad_axis(g, 0, blocks.padded_tokens)

    def chunk_step(carry, j):
        dx, dws = carry
        ws_c, bs_c, w_out_c = _chunk(blocks, j, ws, bs, w_out)
        w_out_t_c = w_out_c.T  # (d_out, chunk): a chunk-sized copy, so the kernel reads K-major.
        h, *dzs = (
            a[:m] for a in _recompute_chunk(phi, xp, gp, ws_c, bs_c, w_out_t_c, bm, bn, interpret)
        )
        dws = tuple(
            lax.dynamic_update_slice_in_dim(dw, _math.mm_tn(x, dz).astype(dw.dtype), j * c, axis=1)
            for dw, dz in zip(dws, dzs, strict=True)
        )
        dbs_c = tuple(
            None if b is None else jnp.sum(dz, 0, dtype=_F32).astype(b.dtype)
            for dz, b in zip(dzs, bs, strict=True)
        )
        for dz, w_c in zip(dzs, ws_c, strict=True):
            dx = dx + _math.mm_nt(dz, w_c)
        return (dx, dws), (dbs_c, _math.mm_tn(h, g).astype(w_out.dtype))

    carry0 = (jnp.zeros(x.shape, _F32), tuple(jnp.zeros_like(w) for w in ws))
    (dx, dws), (dbs_c, dw_out_c) = lax.scan(chunk_step, carry0, _chunk_ids(blocks))
    dbs = tuple(None if db is None else db.reshape(-1) for db in dbs_c)
    dw_out = dw_out_c.reshape(blocks.hidden, -1)
    db_out = None if b_out is None else jnp.sum(g, 0, dtype=_F32).astype(b_out.dtype)
    return dx.astype(x.dtype), dws, dbs, dw_out, db_out

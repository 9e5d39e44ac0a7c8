"""TPU-style Pallas kernels (`pallas_call` with a grid and BlockSpecs).

Compiled by Mosaic TPU on TPU; on CPU run by Pallas' generic interpreter (`interpret=True`) or by
the TPU interpreter (`pltpu.InterpretParams`, which also detects races).

- forward: grid `(token blocks, hidden chunks)`; the output block stays resident across the
  hidden axis and accumulates `b_out + phi(x W + b) @ W_out` in float32.
- dX: the same grid; recomputes the pre-activations and `dh = g @ W_out^T` per chunk and
  accumulates `dz @ W^T`.
- dW: grid `(hidden chunks, token blocks)`; the weight-gradient blocks of one hidden chunk stay
  resident while the token blocks stream past (no atomics, as flash attention's dK/dV).

Every result is written in its input's dtype: a float32 result accumulates in its output block,
any other in a float32 scratch block rounded into the output at the last reduction step, so no
float32 copy of the output, `dx` or a weight gradient exists outside the kernels.

Backward: 7 GEMM-equivalents for a plain FFN (z and dh are recomputed by both kernels), and no
tensor larger than a block besides the inputs and the gradients.

**Operand placement.** Compiled, and under the TPU interpreter, every input is a BlockSpec'd
block that Pallas pipelines into VMEM. Pallas' generic interpreter runs a grid as an XLA loop that
carries each BlockSpec'd operand and writes every block back each step, which XLA answers with
two full copies of every input per kernel (16 MiB for `x` and `g` at 4096 x 256 float32, more
than the scan'd FFN's own residuals). Under that interpreter the inputs are therefore left whole
(`memory_space=pl.ANY`) and the kernel slices out the very block its BlockSpec names (see
`_Operand`); the math, the grid and the outputs are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _compat
from . import _math
from ._blocking import Blocks, pad_axis
from ._problem import HiddenFn


__all__ = ["backward", "forward", "interpret_params", "tpu_blocks"]

_F32 = jnp.float32
IndexMap = Callable[[jax.Array, jax.Array], tuple[Any, Any]]


def tpu_blocks(
    tokens: int, hidden: int, dtype: jnp.dtype, block_m: int | None, block_h: int | None
) -> Blocks:
    """Blocks for these kernels: rows a multiple of the sublane tiling, chunks of 128 lanes."""
    m_align = 8 * (4 // jnp.dtype(dtype).itemsize)
    return Blocks.choose(
        tokens, hidden, block_m=block_m or 256, block_h=block_h or 512, m_align=m_align, h_align=128
    )


def interpret_params():
    """`interpret=` for running these kernels under the TPU interpreter on CPU."""
    return _compat.tpu_interpret_params()


@dataclasses.dataclass(frozen=True)
class _Operand:
    """A kernel input read one `block` per grid step, at block indices `index(*program_ids)`.

    `whole=False`: a BlockSpec (Pallas delivers the block). `whole=True` (the generic
    interpreter): the array stays whole and `load` slices the same block out of it.
    """

    block: tuple[int, int]
    index: IndexMap
    whole: bool

    def spec(self) -> pl.BlockSpec:
        if self.whole:
            return pl.BlockSpec(memory_space=pl.ANY)
        return pl.BlockSpec(self.block, self.index)

    def load(self, ref) -> jax.Array:
        if not self.whole:
            return ref[...]
        ids = self.index(pl.program_id(0), pl.program_id(1))
        return ref[tuple(pl.ds(k * b, b) for k, b in zip(ids, self.block, strict=True))]


def _operands(
    blocks: Blocks,
    d: int,
    d_out: int,
    k: int,
    n_bias: int,
    index: IndexMap,
    interpret: Any,
    *,
    with_g: bool,
) -> list[_Operand]:
    """`(x, [g], W_1..W_k, present b_i, W_out)` for a grid whose program ids `index` maps to
    `(token block, hidden chunk)`."""
    bm, bh, whole = blocks.block_m, blocks.block_h, interpret is True

    def rows(*p):
        return index(*p)[0], 0

    def cols(*p):
        return 0, index(*p)[1]

    def chunk_rows(*p):
        return index(*p)[1], 0

    return [
        _Operand((bm, d), rows, whole),
        *([_Operand((bm, d_out), rows, whole)] if with_g else []),
        *[_Operand((d, bh), cols, whole) for _ in range(k)],
        *[_Operand((1, bh), cols, whole) for _ in range(n_bias)],
        _Operand((bh, d_out), chunk_rows, whole),
    ]


def _pad_inputs(blocks: Blocks, x, ws, bs, w_out):
    """Zero-pad to whole blocks (no copy of an operand whose sizes are whole already)."""
    mp, hp = blocks.padded_tokens, blocks.padded_hidden
    x = pad_axis(x, 0, mp)
    ws = tuple(pad_axis(w, 1, hp) for w in ws)
    bs = tuple(pad_axis(b.reshape(1, -1), 1, hp) for b in bs if b is not None)
    return x, ws, bs, pad_axis(w_out, 0, hp)


def _unpad(a: jax.Array, axis: int, size: int) -> jax.Array:
    """`a` cut to `size` along `axis` (itself when nothing was padded)."""
    return a if a.shape[axis] == size else lax.slice_in_dim(a, 0, size, axis=axis)


def _split_present(values: Sequence[Any], has_b: Sequence[bool]) -> list[Any]:
    """Spread the present biases' `values` over `has_b`, `None` where a bias is absent."""
    it = iter(values)
    return [next(it) if present else None for present in has_b]


def _scratch(dtype, shapes: Sequence[tuple[int, ...]]) -> list[Any]:
    """Float32 accumulator blocks for outputs of `dtype`; none when `dtype` is float32."""
    return [] if jnp.dtype(dtype) == _F32 else [pltpu.VMEM(s, _F32) for s in shapes]


def _accumulate(
    outs,
    accs,
    first,
    last,
    init: Callable[[], Sequence[jax.Array]],
    updates: Callable[[], Sequence[jax.Array]],
) -> None:
    """Accumulate `updates()` into `outs` over a reduction axis of the grid, in float32.

    At step `first` the accumulators start from `init()`. `accs` are float32 scratch blocks,
    rounded into `outs` at step `last`; empty when `outs` are float32 and accumulate in place.
    """
    targets = accs or outs

    @pl.when(first)
    def _init():
        for t, v in zip(targets, init(), strict=True):
            t[...] = jnp.broadcast_to(v, t.shape).astype(t.dtype)

    for t, u in zip(targets, updates(), strict=True):
        t[...] += u
    if accs:

        @pl.when(last)
        def _finish():
            for o, a in zip(outs, accs, strict=True):
                o[...] = a[...].astype(o.dtype)


def _call(kernel, *, grid, operands, out_specs, out_shape, scratch, interpret, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[op.spec() for op in operands],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )


def forward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, *, interpret: Any = False):
    """`phi(x W + b) @ W_out + b_out` for `x` of shape `(tokens, d)`; returns `x.dtype`."""
    k, bm, bh = len(ws), blocks.block_m, blocks.block_h
    d, d_out = x.shape[1], w_out.shape[1]
    has_b = tuple(b is not None for b in bs)
    xp, wsp, bsp, w_outp = _pad_inputs(blocks, x, ws, bs, w_out)
    ops = _operands(blocks, d, d_out, k, len(bsp), lambda i, j: (i, j), interpret, with_g=False)
    b_outp = () if b_out is None else (b_out.reshape(1, -1),)
    ops += [_Operand((1, d_out), lambda i, j: (0, 0), False) for _ in b_outp]

    def kernel(*refs):
        ins, (out_ref, *acc_refs) = refs[: len(ops)], refs[len(ops) :]
        x_b, *rest = (op.load(r) for op, r in zip(ops, ins, strict=True))
        w_b, b_b = rest[:k], _split_present(rest[k : k + len(bsp)], has_b)
        w_out_b, b_out_b = rest[k + len(bsp)], rest[k + len(bsp) + 1 :]
        i, j = pl.program_id(0), pl.program_id(1)

        def init():
            return [b_out_b[0].astype(_F32) if b_out_b else jnp.zeros((), _F32)]

        def updates():
            zs = _math.preactivations(x_b, w_b, b_b)
            mask = _math.valid_mask(i * bm, bm, 0, j * bh, bh, blocks.mask_cols)
            h = _math.hidden(phi, zs, mask).astype(x_b.dtype)
            return [_math.mm(h, w_out_b)]

        _accumulate([out_ref], acc_refs, j == 0, j == blocks.grid_h - 1, init, updates)

    out = _call(
        kernel,
        grid=(blocks.grid_m, blocks.grid_h),
        operands=ops,
        out_specs=pl.BlockSpec((bm, d_out), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((blocks.padded_tokens, d_out), x.dtype),
        scratch=_scratch(x.dtype, [(bm, d_out)]),
        interpret=interpret,
        name="ffn_forward",
    )(xp, *wsp, *bsp, w_outp, *b_outp)
    return _unpad(out, 0, blocks.tokens)


def _recompute(phi, blocks: Blocks, ops, in_refs, k, has_b, i, j):
    """Load one `(token block i, hidden chunk j)` tile and recompute it: returns `x`, `g`, the
    input weights, `h` and the `dz`s (the latter two zero outside the valid rows/columns)."""
    bm, bh, n_bias = blocks.block_m, blocks.block_h, sum(has_b)
    x_b, g_b, *rest = (op.load(r) for op, r in zip(ops, in_refs, strict=True))
    w_b, b_b, w_out_b = rest[:k], _split_present(rest[k : k + n_bias], has_b), rest[-1]
    zs = _math.preactivations(x_b, w_b, b_b)
    dh = _math.mm_nt(g_b, w_out_b)
    mask = _math.valid_mask(i * bm, bm, blocks.mask_rows, j * bh, bh, blocks.mask_cols)
    h, dzs = _math.hidden_and_dz(phi, zs, dh, mask)
    return x_b, g_b, w_b, h, dzs


def _dx(phi, blocks: Blocks, operands, k, has_b, *, interpret):
    """`dx = sum_i dz_i @ W_i^T`: grid (token blocks i, hidden chunks j), resident across j."""
    xp, gp = operands[0], operands[1]
    d, d_out = xp.shape[1], gp.shape[1]
    ops = _operands(blocks, d, d_out, k, sum(has_b), lambda i, j: (i, j), interpret, with_g=True)

    def kernel(*refs):
        ins, (dx_ref, *acc_refs) = refs[: len(ops)], refs[len(ops) :]
        i, j = pl.program_id(0), pl.program_id(1)

        def updates():
            x_b, _, w_b, _, dzs = _recompute(phi, blocks, ops, ins, k, has_b, i, j)
            terms = [_math.mm_nt(dz.astype(x_b.dtype), w) for dz, w in zip(dzs, w_b, strict=True)]
            dx = terms[0]
            for term in terms[1:]:
                dx = dx + term
            return [dx]

        _accumulate(
            [dx_ref],
            acc_refs,
            j == 0,
            j == blocks.grid_h - 1,
            lambda: [jnp.zeros((), _F32)],
            updates,
        )

    return _call(
        kernel,
        grid=(blocks.grid_m, blocks.grid_h),
        operands=ops,
        out_specs=pl.BlockSpec((blocks.block_m, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(xp.shape, xp.dtype),
        scratch=_scratch(xp.dtype, [(blocks.block_m, d)]),
        interpret=interpret,
        name="ffn_backward_dx",
    )(*operands)


def _dw(phi, blocks: Blocks, operands, k, has_b, *, interpret):
    """`(dW_1..dW_k, present db_i, dW_out)`: grid (hidden chunks j, token blocks i), the
    gradient blocks of chunk j resident across i."""
    xp, gp = operands[0], operands[1]
    d, d_out, bh, hp = xp.shape[1], gp.shape[1], blocks.block_h, blocks.padded_hidden
    n_bias = sum(has_b)
    ops = _operands(blocks, d, d_out, k, n_bias, lambda j, i: (i, j), interpret, with_g=True)
    shapes = [*[(d, bh)] * k, *[(1, bh)] * n_bias, (bh, d_out)]
    index_maps = [*[lambda j, i: (0, j)] * (k + n_bias), lambda j, i: (j, 0)]
    n_out = len(shapes)

    def kernel(*refs):
        ins, outs = refs[: len(ops)], refs[len(ops) :]
        out_refs, acc_refs = outs[:n_out], outs[n_out:]
        j, i = pl.program_id(0), pl.program_id(1)

        def updates():
            x_b, g_b, _, h, dzs = _recompute(phi, blocks, ops, ins, k, has_b, i, j)
            dws = [_math.mm_tn(x_b, dz.astype(x_b.dtype)) for dz in dzs]
            dbs = [
                jnp.sum(dz, axis=0, keepdims=True)
                for dz, present in zip(dzs, has_b, strict=True)
                if present
            ]
            return [*dws, *dbs, _math.mm_tn(h.astype(x_b.dtype), g_b)]

        _accumulate(
            out_refs,
            acc_refs,
            i == 0,
            i == blocks.grid_m - 1,
            lambda: [jnp.zeros((), _F32)] * n_out,
            updates,
        )

    full = [*[(d, hp)] * k, *[(1, hp)] * n_bias, (hp, d_out)]
    return _call(
        kernel,
        grid=(blocks.grid_h, blocks.grid_m),
        operands=ops,
        out_specs=[pl.BlockSpec(s, m) for s, m in zip(shapes, index_maps, strict=True)],
        out_shape=[jax.ShapeDtypeStruct(s, xp.dtype) for s in full],
        scratch=_scratch(xp.dtype, shapes),
        interpret=interpret,
        name="ffn_backward_dw",
    )(*operands)


def backward(phi: HiddenFn, blocks: Blocks, x, ws, bs, w_out, b_out, g, *, interpret: Any = False):
    """Cotangents `(dx, dws, dbs, dw_out, db_out)` of `forward` at `g`, recomputing `h` blockwise.

    Returned in the dtypes of the corresponding inputs (`None` for absent biases).
    """
    k, h = len(ws), blocks.hidden
    has_b = tuple(b is not None for b in bs)
    xp, wsp, bsp, w_outp = _pad_inputs(blocks, x, ws, bs, w_out)
    operands = (xp, pad_axis(g, 0, blocks.padded_tokens), *wsp, *bsp, w_outp)
    dx = _dx(phi, blocks, operands, k, has_b, interpret=interpret)
    grads = _dw(phi, blocks, operands, k, has_b, interpret=interpret)
    dbs = _split_present([_unpad(db, 1, h).reshape(h) for db in grads[k:-1]], has_b)
    db_out = None if b_out is None else jnp.sum(g, axis=0, dtype=_F32).astype(b_out.dtype)
    return (
        _unpad(dx, 0, blocks.tokens),
        tuple(_unpad(dw, 1, h) for dw in grads[:k]),
        tuple(dbs),
        _unpad(grads[-1], 0, h),
        db_out,
    )

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

Both kernels are one tile kernel (`_tiles_kernel`) scheduled by a `TuningConfig`
(`kernels.ffn._config`): the GEMMs of a tile in one pipeline per GEMM (`legacy`) or per left
operand, WGMMAs waited for every step or one step late, one warpgroup or a producer and two
consumers (`emit_pipeline_warp_specialized`), a `(m, n)` grid or one persistent program per SM.
`legacy` keeps the schedule of the kernel before configs (its program differs only in slicing
the operands' refs before the pipeline instead of in the BlockSpec index maps).
"""

from __future__ import annotations

import dataclasses
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
from ._config import TuningConfig
from ._problem import HiddenFn


__all__ = [
    "backward",
    "check_shared_memory",
    "check_supported",
    "forward",
    "gpu_blocks",
    "interpret_params",
]

_F32 = jnp.float32
_SWIZZLE = 128  # bytes; a K-block of one 128-byte swizzle row (64 bf16/f16 elements).
_WGMMA_M = 64  # one warpgroup's WGMMA M.
_SMEM_BYTES = 220 * 1024  # of a Hopper SM's 227 KiB, leaving room for barriers.
_H100_SMS = 132  # SMs of an H100/H200 SXM: a persistent grid's size when lowering without a GPU.
_PRODUCER_REGISTERS = 40  # the TMA warpgroup's registers (JAX's Hopper matmul uses 40).


def interpret_params(*, detect_races: bool = False) -> Any:
    """`interpret=` that runs these kernels under the Mosaic GPU interpreter on CPU."""
    return _compat.gpu_interpret_params(detect_races=detect_races)


def _block_k(dtype) -> int:
    return _SWIZZLE // jnp.dtype(dtype).itemsize


def _transforms(dtype) -> tuple[Any, ...]:
    return (plgpu.TilingTransform((8, _block_k(dtype))), plgpu.SwizzleTransform(_SWIZZLE))


def check_supported(
    x: jax.Array | jax.ShapeDtypeStruct,
    ws: Sequence[jax.Array | jax.ShapeDtypeStruct],
    w_out: jax.Array | jax.ShapeDtypeStruct,
    *,
    compiled: bool,
    config: TuningConfig | None = None,
) -> None:
    """Raise `NotImplementedError` (with the reason) for calls these kernels cannot serve."""
    config = config or TuningConfig.legacy()
    _compat.check_gpu_features(config)
    dtype = jnp.dtype(x.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(
            f"{dtype.name} is not served by the Mosaic GPU kernels (they take bfloat16/float16)"
        )
    bk, tn = _block_k(dtype), config.tile_n(len(ws))
    d, hidden, d_out = x.shape[1], ws[0].shape[1], w_out.shape[1]
    for name, size, mult in (("d", d, bk), ("d_out", d_out, bk), ("hidden", hidden, tn)):
        if size % mult:
            raise NotImplementedError(f"{name}={size} is not a multiple of {mult}")
    if compiled:
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        if float(cc) < 9.0:
            raise NotImplementedError(f"WGMMA needs an sm_90 (Hopper) GPU, found sm_{cc}")


def check_shared_memory(x, ws, w_out, config: TuningConfig) -> None:
    """Raise `NotImplementedError` if the forward's or the backward's tile does not fit in shared
    memory at two stages (`_tiling` lowers the stages until it does). Call it after
    `check_supported`, with the `block_m` the kernels will run."""
    k, bm, bn = len(ws), config.block_m, config.resolved_block_n(len(ws))
    hidden = ws[0].shape[1]
    fwd = (x, *ws)
    w_t = jax.ShapeDtypeStruct((w_out.shape[1], hidden), x.dtype)
    g = jax.ShapeDtypeStruct((x.shape[0], w_out.shape[1]), x.dtype)
    bwd = (x, *ws, g, w_t)
    _tiling([(0, 1 + j) for j in range(k)], fwd, 1, k, bm, bn, config)
    if config.warp_specialized and x.shape[1] != w_out.shape[1]:
        config = dataclasses.replace(config, warp_specialized=False)
    _tiling([*((0, 1 + j) for j in range(k)), (k + 1, k + 2)], bwd, k + 1, k, bm, bn, config)


def gpu_blocks(
    tokens: int,
    hidden: int,
    arity: int,
    block_m: int | None,
    block_h: int | None,
    *,
    compiled: bool = False,
    config: TuningConfig | None = None,
) -> Blocks:
    """Token blocks of `block_m` rows and hidden chunks of `block_h` columns (each defaults to
    `config`'s, `TuningConfig.legacy()`'s when `config` is `None`: 64 and 1024).

    The chunk is the largest multiple of the tile width (`config.tile_n(arity)`: 128, 64
    gated, for the legacy config) that divides `hidden` and is at most `block_h` (but at least
    one tile). Compiled kernels round `block_m` up to a multiple of 64, the M of one
    warpgroup's WGMMA (Mosaic GPU rejects any other accumulator height); the interpreter takes
    any `block_m`.
    """
    config = config or TuningConfig.legacy()
    tn = config.tile_n(arity)
    chunk = max(min(block_h or config.block_h, hidden) // tn * tn, tn)
    while hidden % chunk:
        chunk -= tn
    bm = block_m or config.block_m
    if compiled:
        bm = min(round_up(bm, _WGMMA_M), round_up(tokens, _WGMMA_M))
    return Blocks(tokens, hidden, bm, chunk)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """What one tile kernel runs: the GEMMs `operands[a] @ operands[b]` (one float32
    accumulator each), grouped into pipelines, with the config's schedule."""

    gemms: tuple[tuple[int, int], ...]
    pipelines: tuple[tuple[int, ...], ...]
    bm: int
    bn: int
    wgs: int  # consumer warpgroups (1 without warp specialization)
    stages: int
    slots: int  # epilogue buffers per output (2: double-buffered, persistent grids)
    config: TuningConfig


def _pipelines(gemms, operands, config: TuningConfig) -> tuple[tuple[int, ...], ...]:
    """Which GEMMs share a pipeline: each its own (legacy); with `share_lhs` one per left
    operand, or all in one when their K agree (a warp-specialized kernel needs one)."""
    if not config.share_lhs and not config.warp_specialized:
        return tuple((i,) for i in range(len(gemms)))
    ks = {operands[a].shape[1] for a, _ in gemms}
    if len(ks) == 1:
        return (tuple(range(len(gemms))),)
    if config.warp_specialized:
        raise NotImplementedError("a warp-specialized tile needs every GEMM to share K")
    lhs = list(dict.fromkeys(a for a, _ in gemms))
    return tuple(tuple(i for i, (a, _) in enumerate(gemms) if a == a0) for a0 in lhs)


def _smem_bytes(t: _Tiling, operands, n_out: int, n_bias: int, stages: int, slots: int) -> int:
    item = jnp.dtype(operands[0].dtype).itemsize
    bk = _block_k(operands[0].dtype)
    per_stage = 0
    for p in t.pipelines:
        lhs = {t.gemms[i][0] for i in p}
        per_stage = max(per_stage, (len(lhs) * t.bm + len(p) * t.bn * t.wgs) * bk * item)
    outs = t.wgs * slots * n_out * t.bm * t.bn * item
    return stages * per_stage + outs + t.wgs * max(n_bias, 1) * t.bn * item


def _tiling(gemms, operands, n_out, n_bias, bm, bn, config: TuningConfig) -> _Tiling:
    """The config's schedule, with stages (then epilogue buffers) lowered to fit shared memory."""
    t = _Tiling(
        gemms=tuple(gemms),
        pipelines=_pipelines(gemms, operands, config),
        bm=bm,
        bn=bn,
        wgs=config.compute_wgs if config.warp_specialized else 1,
        stages=config.stages,
        slots=2 if config.persistent else 1,
        config=config,
    )
    floor = max(2, config.wgmmas_in_flight + 1)
    for slots in range(t.slots, 0, -1):
        for stages in range(t.stages, floor - 1, -1):
            if _smem_bytes(t, operands, n_out, n_bias, stages, slots) <= _SMEM_BYTES:
                return dataclasses.replace(t, stages=stages, slots=slots)
    need = _smem_bytes(t, operands, n_out, n_bias, floor, 1)
    raise NotImplementedError(
        f"a ({bm}, {bn * t.wgs}) tile of {len(gemms)} GEMMs needs {need // 1024} KiB of shared "
        f"memory at {floor} stages (a Hopper SM has {_SMEM_BYTES // 1024}); use a smaller "
        "block_m/block_n or a config without warp specialization"
    )


def _grid_size(tiles: int, config: TuningConfig, interpret: Any) -> int:
    sms = config.num_sms
    if sms is None:
        device = jax.devices()[0]
        sms = getattr(device, "core_count", None) if interpret is False else None
        sms = sms if device.platform == "gpu" and sms else _H100_SMS
    return max(1, min(sms, tiles))


def _run_pipeline(t: _Tiling, pipeline, operands, acc_refs, mi, col0, *, wg=None, allocs=None):
    """`acc_refs[i] += a_i[rows] @ b_i[:, cols]` for the GEMMs of one pipeline, over K.

    Without warp specialization this emits the pipeline; with it (`wg` given) it returns the
    body and specs for `emit_pipeline_warp_specialized`.
    """
    dtype = operands[0].dtype
    bk, tr = _block_k(dtype), _transforms(dtype)
    lhs = list(dict.fromkeys(t.gemms[i][0] for i in pipeline))
    tn = t.bn * t.wgs
    k_steps = operands[lhs[0]].shape[1] // bk
    # One K step leaves nothing to overlap. It is also where a persistent warp-specialized
    # pipeline with delay_release=1 goes wrong under the interpreter (jax 0.10.2: wrong sums at
    # 2 stages, a barrier-phase error at 3), so such a pipeline waits for every WGMMA.
    lag = t.config.wgmmas_in_flight if k_steps > t.config.wgmmas_in_flight else 0
    extra: dict[str, Any] = {"delay_release": lag} if lag else {}
    specs, srcs = [], []
    for a in lhs:
        specs.append(
            plgpu.BlockSpec(
                (t.bm, bk),
                lambda kk: (0, kk),
                transforms=tr,
                **extra,
            )
        )
        srcs.append(operands[a].at[pl.ds(mi * t.bm, t.bm), :])
    for i in pipeline:
        specs.append(
            plgpu.BlockSpec(
                (bk, tn),
                lambda kk: (kk, 0),
                transforms=tr,
                **extra,
            )
        )
        srcs.append(operands[t.gemms[i][1]].at[:, pl.ds(col0, tn)])

    def mma(smems, accs):
        for j, i in enumerate(pipeline):
            b_smem = smems[len(lhs) + j]
            if wg is not None and t.wgs > 1:
                b_smem = b_smem.at[:, pl.ds(wg * t.bn, t.bn)]
            plgpu.wgmma(accs[j], smems[lhs.index(t.gemms[i][0])], b_smem)
        # Leave this step's WGMMAs in flight (lag 1) or none (lag 0): the pipeline holds the
        # previous step's buffers until now (delay_release), so they may then be refilled.
        plgpu.wgmma_wait(lag * len(pipeline))

    if wg is None:

        def step(_, *smems):
            mma(smems, [acc_refs[i] for i in pipeline])

        plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=specs, max_concurrent_steps=t.stages)(
            *srcs
        )
        if lag:
            plgpu.wgmma_wait(0)
        return None
    return k_steps, specs, srcs, mma


def _tiles_kernel(epilogue, operands, gemms, n_bias, n_out, rows, cols, bm, bn, config, interpret):
    """One `plgpu.kernel` over `(rows/bm, cols/tile_n)` output tiles.

    `operands = (arrays..., bias_1, ..., bias_q)`; `gemms` are `(a, b)` operand indices. A tile
    computes the float32 accumulators `operands[a] @ operands[b]`, adds bias `i` to accumulator
    `i`, and stores `epilogue(*accumulators)` (`n_out` arrays) to `(rows, cols)`.
    """
    dtype = operands[0].dtype
    arrays = operands[: len(operands) - n_bias]
    t = _tiling(gemms, arrays, n_out, n_bias, bm, bn, config)
    tr, tn = _transforms(dtype), bn * t.wgs
    m_tiles, n_tiles = rows // bm, cols // tn
    ws_mode = config.warp_specialized

    def store(accs, mi, col0, wg, slot, scratch, biases, outs):
        """Bias, epilogue, and the results' copy to global memory (left in flight)."""
        out_smems, bias_smem, barrier = scratch
        accs = list(accs)
        for q in range(n_bias):
            plgpu.copy_gmem_to_smem(
                biases[q].at[pl.ds(col0, bn)], bias_smem.at[wg, q], barrier.at[wg * n_bias + q]
            )
            plgpu.barrier_wait(barrier.at[wg * n_bias + q])
            b = _compat.gpu_layout_cast(bias_smem[wg, q], plgpu.Layout.WGMMA.reduce(0), interpret)
            accs[q] = accs[q] + lax.broadcast_in_dim(b.astype(_F32), (bm, bn), (1,))
        results = epilogue(*accs)
        if t.slots > 1:  # this slot's copies of two tiles ago must have left shared memory
            plgpu.wait_smem_to_gmem(n_out, wait_read_only=True)
        elif config.persistent:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for value, o_smem in zip(results, out_smems, strict=True):
            o_smem[wg, slot] = value.astype(dtype)
        plgpu.commit_smem()
        for o_smem, o_gmem in zip(out_smems, outs, strict=True):
            plgpu.copy_smem_to_gmem(
                o_smem.at[wg, slot], o_gmem.at[pl.ds(mi * bm, bm), pl.ds(col0, bn)]
            )

    def tiles(visit):
        """Call `visit(mi, ni, slot)` for this program's tiles."""
        if config.persistent:

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def _(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, config.grid_tile_width)
                visit(mi, ni, info.local_index % t.slots if t.slots > 1 else 0)
        else:
            visit(lax.axis_index("m"), lax.axis_index("n"), 0)

    def scratch_types():
        return dict(
            out_smems=[
                plgpu.SMEM((t.wgs, t.slots, bm, bn), dtype, transforms=tr) for _ in range(n_out)
            ],
            bias_smem=plgpu.SMEM((t.wgs, max(n_bias, 1), bn), dtype),
            barrier=plgpu.Barrier(num_barriers=t.wgs * max(n_bias, 1)),
        )

    def body(*refs):
        ins, biases, outs = (
            refs[: len(arrays)],
            refs[len(arrays) : len(operands)],
            refs[len(operands) :],
        )
        if not ws_mode:

            def plain_scope(out_smems, bias_smem, barrier):
                def visit(mi, ni, slot):
                    def acc_scope(*acc_refs):
                        for p in t.pipelines:
                            _run_pipeline(t, p, ins, acc_refs, mi, ni * tn)
                        return [r[...] for r in acc_refs]

                    accs = pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn), _F32) for _ in gemms])
                    scratch = (out_smems, bias_smem, barrier)
                    store(accs, mi, ni * tn, 0, slot, scratch, biases, outs)

                tiles(visit)

            scratch: Any = scratch_types()
            pl.run_scoped(plain_scope, **scratch)
            plgpu.wait_smem_to_gmem(0)
            return

        (pipeline,) = t.pipelines
        ignore = lambda *_, **__: None  # noqa: E731

        def make(mi, ni, wg, compute_context):
            parts: Any = _run_pipeline(t, pipeline, ins, None, mi, ni * tn, wg=wg)
            k_steps, specs, srcs, mma = parts

            def step(_, *smems_and_accs):
                smems, accs = smems_and_accs[:-1], smems_and_accs[-1]
                mma(smems, accs)
                return accs

            return plgpu.emit_pipeline_warp_specialized(
                step if compute_context is not ignore else ignore,
                grid=(k_steps,),
                memory_registers=_PRODUCER_REGISTERS,
                in_specs=specs,
                wg_axis="wg",
                num_compute_wgs=t.wgs,
                max_concurrent_steps=t.stages,
                compute_context=compute_context,
            ), srcs

        zero = jnp.int32(0)
        proto, proto_srcs = make(zero, zero, zero, ignore)

        def ws_scope(allocs, out_smems, bias_smem, barrier):
            wg = lax.axis_index("wg")

            def visit(mi, ni, slot):
                def compute_context(eval_pipeline):
                    def acc_scope(*acc_refs):
                        eval_pipeline(tuple(acc_refs))
                        plgpu.wgmma_wait(0)
                        accs = [r[...] for r in acc_refs]
                        scratch = (out_smems, bias_smem, barrier)
                        store(accs, mi, ni * tn + wg * bn, wg, slot, scratch, biases, outs)

                    pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn), _F32) for _ in gemms])

                run, srcs = make(mi, ni, wg, compute_context)
                run(*srcs, allocations=allocs)

            tiles(visit)

        pl.run_scoped(
            ws_scope,
            proto.get_allocations(*proto_srcs),
            **scratch_types(),
            collective_axes="wg",
        )
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kwargs: dict[str, Any] = {} if interpret is False else {"interpret": interpret}
    if config.persistent:
        kwargs |= dict(grid=(_grid_size(m_tiles * n_tiles, config, interpret),), grid_names=("sm",))
    else:
        kwargs |= dict(grid=(m_tiles, n_tiles), grid_names=("m", "n"))
    if ws_mode:
        kwargs |= dict(num_threads=t.wgs + 1, thread_name="wg")
    return plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct((rows, cols), dtype) for _ in range(n_out)],
        **kwargs,
    )(*operands)


def _with_bias_first(ws, bs):
    """Reorder projections so that those with a bias come first (bias q goes to accumulator q);
    returns the order and its inverse."""
    order = sorted(range(len(ws)), key=lambda i: bs[i] is None)
    inverse = [order.index(i) for i in range(len(ws))]
    return order, inverse


def _hidden_chunk(phi, xp, ws_c, bs_c, bm, config, interpret):
    """`h = phi(x W_c + b_c)` for one hidden chunk, `(padded tokens, chunk)` in `x.dtype`."""
    order, inverse = _with_bias_first(ws_c, bs_c)
    biases = [bs_c[i] for i in order if bs_c[i] is not None]
    k = len(ws_c)

    def epilogue(*zs):
        return (_math.hidden(phi, [zs[j] for j in inverse], None),)

    (h,) = _tiles_kernel(
        epilogue,
        (xp, *(ws_c[i] for i in order), *biases),
        [(0, 1 + j) for j in range(k)],
        len(biases),
        1,
        xp.shape[0],
        ws_c[0].shape[1],
        bm,
        config.resolved_block_n(k),
        config,
        interpret,
    )
    return h


def _recompute_chunk(phi, xp, gp, ws_c, bs_c, w_out_t_c, bm, config, interpret):
    """`(h, dz_1, ..., dz_k)` for one hidden chunk, each `(padded tokens, chunk)`.

    `w_out_t_c` is the chunk of `W_out^T`, `(d_out, chunk)`, so `dh = g @ w_out_t_c`. A
    warp-specialized config needs one pipeline, so `d == d_out`; otherwise this kernel runs
    the same config without warp specialization.
    """
    order, inverse = _with_bias_first(ws_c, bs_c)
    k = len(ws_c)
    biases = [bs_c[i] for i in order if bs_c[i] is not None]
    if config.warp_specialized and xp.shape[1] != gp.shape[1]:
        config = dataclasses.replace(config, warp_specialized=False)

    def epilogue(*accs):
        zs, dh = [accs[j] for j in inverse], accs[k]
        h, dzs = _math.hidden_and_dz(phi, zs, dh, None, plain_adds=True)
        return (h, *dzs)

    return _tiles_kernel(
        epilogue,
        (xp, *(ws_c[i] for i in order), gp, w_out_t_c, *biases),
        [*((0, 1 + j) for j in range(k)), (k + 1, k + 2)],
        len(biases),
        k + 1,
        xp.shape[0],
        ws_c[0].shape[1],
        bm,
        config.resolved_block_n(k),
        config,
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


def forward(
    phi: HiddenFn,
    blocks: Blocks,
    x,
    ws,
    bs,
    w_out,
    b_out,
    *,
    interpret: Any = False,
    config: TuningConfig | None = None,
):
    """`phi(x W + b) @ W_out + b_out` for `x` of shape `(tokens, d)`; returns `x.dtype`."""
    config = config or TuningConfig.legacy()
    bm, m = blocks.block_m, blocks.tokens
    xp = pad_axis(x, 0, blocks.padded_tokens)

    def chunk_step(out, j):
        ws_c, bs_c, w_out_c = _chunk(blocks, j, ws, bs, w_out)
        h = _hidden_chunk(phi, xp, ws_c, bs_c, bm, config, interpret)[:m]
        return out + _math.mm(h, w_out_c), None

    out0 = jnp.zeros((m, w_out.shape[1]), _F32)
    if b_out is not None:
        out0 = out0 + b_out.astype(_F32)[None, :]
    out, _ = lax.scan(chunk_step, out0, _chunk_ids(blocks))
    return out.astype(x.dtype)


def backward(
    phi: HiddenFn,
    blocks: Blocks,
    x,
    ws,
    bs,
    w_out,
    b_out,
    g,
    *,
    interpret: Any = False,
    config: TuningConfig | None = None,
):
    """Cotangents `(dx, dws, dbs, dw_out, db_out)` of `forward` at `g`, one hidden chunk at a
    time; in the dtypes of the corresponding inputs.

    `dW_i` chunks are written in place into a `(d, hidden)` scan carry (no stacked copy to
    transpose); `db_i` and `dW_out` chunks stack along the hidden axis as they are.
    """
    config = config or TuningConfig.legacy()
    bm, m, c = blocks.block_m, blocks.tokens, blocks.block_h
    xp, gp = pad_axis(x, 0, blocks.padded_tokens), pad_axis(g, 0, blocks.padded_tokens)

    def chunk_step(carry, j):
        dx, dws = carry
        ws_c, bs_c, w_out_c = _chunk(blocks, j, ws, bs, w_out)
        w_out_t_c = w_out_c.T  # (d_out, chunk): a chunk-sized copy, so the kernel reads K-major.
        h, *dzs = (
            a[:m]
            for a in _recompute_chunk(phi, xp, gp, ws_c, bs_c, w_out_t_c, bm, config, interpret)
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

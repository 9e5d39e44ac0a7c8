"""Tuning configurations of the Mosaic GPU kernels, and the dispatcher's default per shape class.

A `TuningConfig` fixes how each tile kernel (the forward's hidden kernel and the backward's
recompute kernel, see `kernels.ffn._pallas_gpu`) runs on a Hopper GPU. The recipe follows JAX's
own Hopper matmul (`jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py`) and its pipelining
guide (`docs/pallas/gpu/pipelining.md`):

- `wgmmas_in_flight=1`: each pipeline step issues its WGMMAs and waits only for the previous
  step's (`wgmma_wait` with the step's own group left in flight); the pipeline holds each step's
  shared-memory buffers one step longer (`delay_release=1`) so the in-flight WGMMA still reads
  them. With `0` every step ends with `wgmma_wait(0)`, emptying the tensor-core pipeline.
- `share_lhs=True`: the GEMMs of a tile that read the same left operand (`x` for the gate and up
  projections; in the backward `x` for all input projections and `g` for `W_out^T`) run in one
  pipeline, so each `x` tile crosses from global to shared memory once, not once per GEMM.
- `warp_specialized=True`: a producer warpgroup issues the TMA copies and `compute_wgs`
  consumer warpgroups each own a `(block_m, block_n)` half of a `(block_m, compute_wgs *
  block_n)` tile (`plgpu.emit_pipeline_warp_specialized`).
- `persistent=True`: one program per SM (`num_sms`) loops over the output tiles in L2-friendly
  order (`plgpu.nd_loop` and `plgpu.planar_snake`), with a double-buffered epilogue (a tile's
  results are stored to shared memory while the previous tile's copies to global memory drain).

Each of these needs something of the installed JAX; `kernels._compat.check_gpu_features`
refuses a config that needs what is missing, naming the feature and the JAX version.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from .. import _compat


__all__ = ["CONFIGS", "ConfigName", "TuningConfig", "default_config"]

ConfigName = Literal["legacy", "pipelined", "warp_specialized", "persistent"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """How the Mosaic GPU kernels tile and pipeline one FFN call (keyword-only, frozen).

    **Fields:**

    - `block_m`: token rows per consumer warpgroup, a multiple of 64 (WGMMA's M) when compiled.
    - `block_n`: hidden columns per consumer warpgroup; `None` for 128 (plain) or 64 (gated).
    - `block_h`: the hidden chunk each `lax.scan` step covers (rounded to whole tiles).
    - `stages`: shared-memory buffers per pipelined operand (`max_concurrent_steps`); lowered
      automatically, never below 2, when a tile's buffers would not fit in shared memory.
    - `wgmmas_in_flight`: `0` (wait for every WGMMA) or `1` (keep one step's in flight).
    - `share_lhs`: one pipeline per left operand (`x` read once for gate and up).
    - `warp_specialized`, `compute_wgs`: a producer warpgroup and `compute_wgs` consumers.
    - `persistent`, `num_sms`, `grid_tile_width`: one program per SM looping over the tiles,
      ordered by `plgpu.planar_snake` in bands of `grid_tile_width`; `num_sms=None` takes the
      GPU's SM count (132 on H100/H200 when lowering without a GPU).
    """

    block_m: int = 64
    block_n: int | None = None
    block_h: int = 1024
    stages: int = 2
    wgmmas_in_flight: Literal[0, 1] = 0
    share_lhs: bool = False
    warp_specialized: bool = False
    compute_wgs: int = 2
    persistent: bool = False
    num_sms: int | None = None
    grid_tile_width: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_h", "stages", "compute_wgs", "grid_tile_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"TuningConfig: `{name}` must be a positive int, got {value!r}.\n"
                    f"See TuningConfig.legacy() for working values."
                )
        for name in ("block_n", "num_sms"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(
                    f"TuningConfig: `{name}` must be a positive int or None, got {value!r}."
                )
        if self.wgmmas_in_flight not in (0, 1):
            raise ValueError(
                f"TuningConfig: `wgmmas_in_flight` must be 0 or 1, got {self.wgmmas_in_flight!r}."
            )
        if self.stages <= self.wgmmas_in_flight:
            raise ValueError(
                f"TuningConfig: `stages` ({self.stages}) must exceed `wgmmas_in_flight` "
                f"({self.wgmmas_in_flight}): a buffer an in-flight WGMMA reads cannot be refilled."
            )
        if self.warp_specialized and self.compute_wgs not in (1, 2):
            raise ValueError(
                f"TuningConfig: `compute_wgs` must be 1 or 2, got {self.compute_wgs!r} "
                "(a Hopper SM holds at most 3 warpgroups' registers with the producer)."
            )

    @classmethod
    def legacy(cls) -> TuningConfig:
        """The kernel as it was before tuning configs: one warpgroup per `(64, 128)` tile (64
        gated), two stages, `wgmma_wait(0)` every step, one pipeline per GEMM, a `(m, n)` grid.
        The dispatcher's default for plain FFNs and for gated shapes smaller than any measured
        (`default_config`)."""
        return cls()

    def resolved_block_n(self, arity: int) -> int:
        """`block_n`, or the default: one float32 `(64, block_n)` accumulator costs
        `block_n / 2` registers per thread and the recompute kernel holds `arity + 1`."""
        if self.block_n is not None:
            return self.block_n
        return 128 if arity == 1 else 64

    def tile_n(self, arity: int) -> int:
        """The hidden columns of one program's tile (all consumer warpgroups together)."""
        return self.resolved_block_n(arity) * (self.compute_wgs if self.warp_specialized else 1)


CONFIGS: dict[str, TuningConfig] = {
    "legacy": TuningConfig.legacy(),
    # One WGMMA in flight, four stages, x read once for gate and up: the pipelining guide.
    "pipelined": TuningConfig(stages=4, wgmmas_in_flight=1, share_lhs=True),
    # + a producer warpgroup and two consumers over a (64, 2 x 64) tile (64-column halves: a
    # (64, 2 x 128) tile's backward buffers exceed shared memory at two stages).
    "warp_specialized": TuningConfig(
        block_n=64, stages=4, wgmmas_in_flight=1, share_lhs=True, warp_specialized=True
    ),
    # + one program per SM over the tiles in planar-snake order, double-buffered epilogue.
    "persistent": TuningConfig(
        block_n=64,
        stages=4,
        wgmmas_in_flight=1,
        share_lhs=True,
        warp_specialized=True,
        persistent=True,
        grid_tile_width=4,
    ),
}
"""Every named config; the device script (`benchmarks/ffn_device.py`) times each of them."""


# The smallest gated shape class the device table measured `pipelined` fastest in (d, hidden,
# tokens): `benchmarks/results/ffn_device.json`, H200, jax 0.11.2, bf16, d=1024, H=4096.
_GATED_PIPELINED_FROM = (1024, 4096, 16384)


def default_config(tokens: int, d: int, hidden: int, arity: int) -> TuningConfig:
    """The dispatcher's config for a call of this shape class.

    A rule read off the device script's committed tables, `benchmarks/results/ffn_device*.json`
    (markdown twins beside them; `tests/kernels/test_kernel_configs.py` fails when the rule and
    the fastest correct config of a measured case disagree). The H200 run of 2026-12-04
    (`ffn_device.json`: jax 0.11.2, a training step of n scanned iterations, d=1024, H=4096, bf16
    FFN, median of 10 steps) measured:

    - plain FFN: `legacy` fastest in every case. 16384 tokens, n=8: legacy 20.8 ms vs persistent
      21.7, pipelined 22.4, warp_specialized 22.6 (f32->bf16 weights; 20.5 / 21.8 / 22.4 / 22.5
      stored bf16); 65536 tokens, n=4: legacy 37.0 ms vs persistent 38.3, pipelined 39.1,
      warp_specialized 40.0.
    - gated FFN (SwiGLU), 16384 tokens, n=8: `pipelined` fastest, 31.6 ms vs persistent 32.8,
      legacy 33.5, warp_specialized 33.7 (both weight storages within 1%): 6% faster than
      `legacy` (which of its changes, `x` read once for gate and up or a WGMMA in flight, buys
      the 6% was not measured apart).

    So gated calls of at least the measured size (d >= 1024, hidden >= 4096, tokens >= 16384:
    sixteen or more 64-wide K steps per tile, a grid of thousands of tiles) take `pipelined`;
    everything else keeps `legacy`: plain FFNs, and gated shapes smaller than any measured one,
    which includes every shape the CPU tests run in the Mosaic GPU interpreter (the CPU dry run,
    `ffn_device_dry.json`, has no `platform: gpu` row and decides nothing). `pipelined` needs
    `BlockSpec(delay_release=...)`; on a JAX without it the gated class falls back to `legacy`
    rather than refusing a call the old kernel serves.
    """
    measured_size = all(
        size >= least for size, least in zip((d, hidden, tokens), _GATED_PIPELINED_FROM)
    )
    if arity == 2 and measured_size:
        try:
            _compat.check_gpu_features(CONFIGS["pipelined"])
        except NotImplementedError:
            return CONFIGS["legacy"]
        return CONFIGS["pipelined"]
    return CONFIGS["legacy"]

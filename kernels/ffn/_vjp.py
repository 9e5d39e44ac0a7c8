"""The `custom_vjp` shared by every Pallas backend: residuals are the inputs, nothing else."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from ._blocking import Blocks
from ._problem import HiddenFn


__all__ = ["KernelPlan", "fused_ffn"]


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """A backend's kernels bound to one problem: hidden function, tiling and interpret mode.

    `forward(phi, blocks, x, ws, bs, w_out, b_out, *, interpret)` returns the output;
    `backward(..., g, *, interpret)` returns `(dx, dws, dbs, dw_out, db_out)`; both also take
    `config=` when the plan carries one (the Mosaic GPU kernels' `TuningConfig`).
    """

    phi: HiddenFn
    blocks: Blocks
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    interpret: Any = False
    config: Any = None  # a `TuningConfig` for the Mosaic GPU kernels; None elsewhere.

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"interpret": self.interpret}
        if self.config is not None:
            options["config"] = self.config
        return options

    def run_forward(self, x, ws, bs, w_out, b_out):
        return self.forward(self.phi, self.blocks, x, ws, bs, w_out, b_out, **self._options())

    def run_backward(self, x, ws, bs, w_out, b_out, g):
        return self.backward(self.phi, self.blocks, x, ws, bs, w_out, b_out, g, **self._options())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_ffn(plan: KernelPlan, x, ws, bs, w_out, b_out):
    """`plan`'s forward, differentiated by `plan`'s recomputing backward.

    `x` is `(tokens, d)`; `ws`/`bs` are tuples (one entry per input projection, biases may be
    `None`). The backward saves only `(x, ws, bs, w_out, b_out)` — no hidden activation — so a
    `lax.scan` over `n` iterations keeps `n` copies of `x`, never `n` copies of `tokens x hidden`.
    """
    return plan.run_forward(x, ws, bs, w_out, b_out)


def _fused_fwd(plan: KernelPlan, x, ws, bs, w_out, b_out):
    return plan.run_forward(x, ws, bs, w_out, b_out), (x, ws, bs, w_out, b_out)


def _fused_bwd(plan: KernelPlan, residuals, g):
    x, ws, bs, w_out, b_out = residuals
    return plan.run_backward(x, ws, bs, w_out, b_out, g)


fused_ffn.defvjp(_fused_fwd, _fused_bwd)

"""Everything in `kernels` that depends on the installed JAX version (0.10 to 0.12).

Seen drift, and what this module does about it:

- `InterpretGPUParams` (Pallas' Mosaic GPU interpreter, which runs `plgpu.kernel` bodies on CPU)
  is public as `plgpu.InterpretGPUParams` from 0.11; 0.10 ships the same class privately.
- `jax.jit(f).trace(...).lower(lowering_platforms=...)` lowers for a platform the installed
  jaxlib has no device for; the keyword has been stable over 0.10 to 0.12, but it lives here so a
  rename is a one-line fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu, tpu as pltpu


__all__ = ["gpu_interpret_params", "lower_for", "tpu_compiler_params", "tpu_interpret_params"]


def gpu_interpret_params() -> Any:
    """The `interpret=` value that runs a Mosaic GPU (`plgpu.kernel`) body on CPU."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:  # jax 0.10: the same class, not yet re-exported.
        from jax._src.pallas.mosaic_gpu.interpret.params import (  # noqa: PLC0415
            InterpretGPUParams as cls,
        )
    return cls()


def tpu_interpret_params() -> Any:
    """The `interpret=` value that runs a Mosaic TPU `pallas_call` on CPU (races detected)."""
    return pltpu.InterpretParams(detect_races=True)


def tpu_compiler_params(dimension_semantics: Sequence[str]) -> Any:
    """Mosaic TPU compiler parameters with the given grid dimension semantics."""
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))


def lower_for(fn: Callable[..., Any], platform: str, *args: Any) -> Any:
    """Lower `jax.jit(fn)(*args)` for `platform` (e.g. `"cuda"`), with no device of that kind."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))

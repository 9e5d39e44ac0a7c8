"""Everything in `kernels` that depends on the installed JAX version (0.10 to 0.12).

Seen drift, and what this module does about it:

- `InterpretGPUParams` (Pallas' Mosaic GPU interpreter, which runs `plgpu.kernel` bodies on CPU)
  is public as `plgpu.InterpretGPUParams` from 0.11; 0.10 ships the same class privately.
- `jax.jit(f).trace(...).lower(lowering_platforms=...)` lowers for a platform the installed
  jaxlib has no device for; the keyword has been stable over 0.10 to 0.12, but it lives here so a
  rename is a one-line fix.
- The Hopper recipe's features (`BlockSpec(delay_release=...)`, `emit_pipeline_warp_specialized`,
  `nd_loop` and `planar_snake`) are all present, and run under the Mosaic GPU interpreter with
  race detection, on 0.10.2 and 0.12; `check_gpu_features` still refuses a `TuningConfig` whose
  feature a JAX lacks, naming it, so an older or trimmed JAX fails clearly, not deep in lowering.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu, tpu as pltpu


__all__ = [
    "check_gpu_features",
    "gpu_interpret_params",
    "lower_for",
    "tpu_compiler_params",
    "tpu_interpret_params",
]


def gpu_interpret_params(*, detect_races: bool = False) -> Any:
    """The `interpret=` value that runs a Mosaic GPU (`plgpu.kernel`) body on CPU; with
    `detect_races=True` the interpreter's happens-before race detector runs too (both 0.10.2
    and 0.12 have it: both print `RACE DETECTED`, 0.12 raises as well)."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:  # jax 0.10: the same class, not yet re-exported.
        from jax._src.pallas.mosaic_gpu.interpret.params import (  # noqa: PLC0415
            InterpretGPUParams as cls,
        )
    return cls(detect_races=detect_races)


def _has_delay_release() -> bool:
    return "delay_release" in inspect.signature(plgpu.BlockSpec).parameters


# feature -> (what a TuningConfig asks of it, whether the installed JAX has it)
_GPU_FEATURES: dict[str, Callable[[], bool]] = {
    "BlockSpec(delay_release=...)": _has_delay_release,
    "plgpu.emit_pipeline_warp_specialized": lambda: hasattr(
        plgpu, "emit_pipeline_warp_specialized"
    ),
    "plgpu.nd_loop": lambda: hasattr(plgpu, "nd_loop"),
    "plgpu.planar_snake": lambda: hasattr(plgpu, "planar_snake"),
}


def gpu_features_needed(config: Any) -> tuple[str, ...]:
    """The Mosaic GPU features a `kernels.TuningConfig` needs beyond a plain pipeline."""
    needed = []
    if config.wgmmas_in_flight:
        needed.append("BlockSpec(delay_release=...)")
    if config.warp_specialized:
        needed.append("plgpu.emit_pipeline_warp_specialized")
    if config.persistent:
        needed += ["plgpu.nd_loop", "plgpu.planar_snake"]
    return tuple(needed)


def check_gpu_features(config: Any) -> None:
    """Raise `NotImplementedError` naming the feature and the JAX version if the installed JAX
    lacks something `config` needs."""
    missing = [f for f in gpu_features_needed(config) if not _GPU_FEATURES[f]()]
    if missing:
        raise NotImplementedError(
            f"this TuningConfig needs {', '.join(missing)}, which jax {jax.__version__} lacks; "
            "use TuningConfig.legacy() or upgrade JAX"
        )


def tpu_interpret_params() -> Any:
    """The `interpret=` value that runs a Mosaic TPU `pallas_call` on CPU (races detected)."""
    return pltpu.InterpretParams(detect_races=True)


def tpu_compiler_params(dimension_semantics: Sequence[str]) -> Any:
    """Mosaic TPU compiler parameters with the given grid dimension semantics."""
    semantics: Any = tuple(dimension_semantics)  # Literal names in the stubs; ours are str
    return pltpu.CompilerParams(dimension_semantics=semantics)


def lower_for(fn: Callable[..., Any], platform: str, *args: Any) -> Any:
    """Lower `jax.jit(fn)(*args)` for `platform` (e.g. `"cuda"`), with no device of that kind."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def eval_with_plain_adds(closed: Any, *args: Any) -> list[Any]:
    """Evaluate a jaxpr, binding `add_any` (autodiff's cotangent sum) as `lax.add`.

    Mosaic GPU lowers `add` but has no rule for `add_any`, which every `jax.vjp` emits; the two
    are the same function on arrays. Nested `jit`/`closed_call` jaxprs (e.g. `jax.nn.gelu` is
    jitted) are evaluated inline with the same rule; every other equation is bound as it is.
    tietransform's one evaluator (`tietransform._interpret`) does the walking.
    """
    from jax import lax  # noqa: PLC0415
    from jax.extend.core import primitives  # noqa: PLC0415

    from .. import _compat as tt_compat, _interpret  # noqa: PLC0415

    rules = _interpret.Rules(
        {primitives.add_jaxvals_p: lambda eqn, invals, context: [lax.add(*invals)]},
        default=_interpret.bind_plain,
        inline_calls=True,
    )
    jaxpr, consts = tt_compat.split_jaxpr(closed)
    return _interpret.evaluate(jaxpr, consts, args, rules)


def gpu_layout_cast(value: Any, layout: Any, interpret: Any) -> Any:
    """`plgpu.layout_cast(value, layout)`; the identity when interpreting.

    A layout cast is the identity on values. jax 0.10's Mosaic GPU interpreter has no rule for
    it, and the interpreters do not model register layouts, so interpreted kernels skip it.
    """
    return value if interpret is not False else plgpu.layout_cast(value, layout)

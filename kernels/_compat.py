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
    semantics: Any = tuple(dimension_semantics)  # Literal names in the stubs; ours are str
    return pltpu.CompilerParams(dimension_semantics=semantics)


def lower_for(fn: Callable[..., Any], platform: str, *args: Any) -> Any:
    """Lower `jax.jit(fn)(*args)` for `platform` (e.g. `"cuda"`), with no device of that kind."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def _jaxpr_and_consts(closed: Any) -> tuple[Any, Sequence[Any]]:
    # jax <= 0.10: ClosedJaxpr(jaxpr, consts); 0.11+: one Jaxpr that carries its consts.
    inner = getattr(closed, "jaxpr", closed)
    return inner, getattr(closed, "consts", ())


def eval_with_plain_adds(closed: Any, *args: Any) -> list[Any]:
    """Evaluate a jaxpr, binding `add_any` (autodiff's cotangent sum) as `lax.add`.

    Mosaic GPU lowers `add` but has no rule for `add_any`, which every `jax.vjp` emits; the two
    are the same function on arrays. Nested `jit`/`closed_call` jaxprs (e.g. `jax.nn.gelu` is
    jitted) are evaluated recursively, whichever param holds them; every other equation is bound
    as it is.
    """
    from jax import lax  # noqa: PLC0415
    from jax.extend import core as jex  # noqa: PLC0415

    jaxpr, consts = _jaxpr_and_consts(closed)
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    # Calls of one inner jaxpr, keyed on primitive objects (`closed_call` is named `eval_jaxpr`
    # from 0.12 on, where `call_p` is the same object).
    calls = (jex.primitives.jit_p, jex.primitives.closed_call_p, jex.primitives.call_p)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is jex.primitives.add_jaxvals_p:
            outs = [lax.add(*invals)]
        elif eqn.primitive in calls:
            inner = eqn.params["jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"]
            outs = eval_with_plain_adds(inner, *invals)
        else:
            # jax 0.10 returns (subfuns, params); 0.12 returns params only.
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
            ans = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = ans if eqn.primitive.multiple_results else [ans]
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def gpu_layout_cast(value: Any, layout: Any, interpret: Any) -> Any:
    """`plgpu.layout_cast(value, layout)`; the identity when interpreting.

    A layout cast is the identity on values. jax 0.10's Mosaic GPU interpreter has no rule for
    it, and the interpreters do not model register layouts, so interpreted kernels skip it.
    """
    return value if interpret is not False else plgpu.layout_cast(value, layout)

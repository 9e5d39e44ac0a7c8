"""Every JAX-version-dependent detail tietransform relies on, in one place.

Supported: jax 0.10 through 0.12. Drift this module absorbs:

- 0.11 merged `ClosedJaxpr` into `Jaxpr`; both still expose `.jaxpr` (the open jaxpr to evaluate)
  and `.consts`.
- 0.11 replaced scan's `num_consts`/`num_carry` params by the flat trees `ft_in`/`ft_out`.
- 0.12 renamed the `closed_call` primitive `eval_jaxpr` (and made `call_p` the same object). The
  walkers key their rules on primitive objects from `jax.extend.core.primitives`, never on names,
  so a rename costs nothing; `CALL_PRIMITIVES` and `CHECKPOINT_PRIMITIVES` are the sets they use.
- Binding one equation with its source information and context needs
  `jax._src.source_info_util`; it is imported guardedly, and without it equations are still
  bound correctly, only with less precise tracebacks.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core
import jax.numpy as jnp
from jax.extend.core import primitives as _primitives


try:  # Private, used only to keep user tracebacks pointing at user code.
    from jax._src import source_info_util as _source_info_util
except ImportError:  # pragma: no cover - depends on the installed jax
    _source_info_util = None

JAX_VERSION: tuple[int, ...] = tuple(
    int(part) for part in jax.__version__.split(".")[:3] if part.isdigit()
)

# Raised when an op's output sharding is ambiguous under an explicit mesh; private in 0.10-0.12.
SHARDING_TYPE_ERROR: type[Exception] = getattr(
    getattr(getattr(jax, "_src", None), "core", None), "ShardingTypeError", TypeError
)

# Primitives that call one inner jaxpr once, with the equation's inputs in order, and return its
# outputs: `jax.jit` (`jit`), `closed_call` (`eval_jaxpr` from 0.12), `call`.
CALL_PRIMITIVES: frozenset[Any] = frozenset(
    {_primitives.jit_p, _primitives.closed_call_p, _primitives.call_p}
)
# `jax.checkpoint` (`remat2`): a call whose body is recomputed in the backward pass.
CHECKPOINT_PRIMITIVES: frozenset[Any] = frozenset({_primitives.remat_p})
# Every primitive `call_jaxpr` reads: walkers that follow dependencies recurse into these.
CALLS: frozenset[Any] = CALL_PRIMITIVES | CHECKPOINT_PRIMITIVES
# Elementwise primitives (all exist in 0.10-0.12): the FFN matcher's activations, and what the
# stacked-tie rewrite defers to each slice.
ELEMENTWISE: frozenset[Any] = frozenset(
    getattr(_primitives, f"{name}_p")
    for name in """neg sin cos tan tanh logistic exp exp2 log log1p expm1 sqrt rsqrt cbrt abs sign
    integer_pow pow mul add sub div max min erf erfc erf_inv square atan asin acos sinh cosh asinh
    acosh atanh convert_element_type select_n lt gt le ge eq ne copy""".split()
)


def split_jaxpr(jaxpr: Any) -> tuple[Any, list[Any]]:
    """`(open jaxpr, consts)` of a jaxpr found in equation params, closed or open (any version)."""
    if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def call_jaxpr(eqn: Any) -> tuple[Any, list[Any]]:
    """`(open jaxpr, consts)` of an equation of `CALL_PRIMITIVES` or `CHECKPOINT_PRIMITIVES`
    (`jit` and `checkpoint` keep it in `params["jaxpr"]`, `closed_call`/`eval_jaxpr` and `call`
    in `params["call_jaxpr"]`)."""
    params = eqn.params
    return split_jaxpr(params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"])


def inner_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs in an equation's params: non-empty exactly for higher-order primitives."""
    return list(jax.extend.core.jaxprs_in_params(eqn.params))


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates an open jaxpr, keeping each equation's source information and context."""
    return jax.core.eval_jaxpr(jaxpr, list(consts), *args)


def bind_equation(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Binds one jaxpr equation to `invals`, as `eval_jaxpr` does, returning a list of outputs."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if _source_info_util is not None:
        name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
        with (
            _source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
            eqn.ctx.manager,
        ):
            out = eqn.primitive.bind(*invals, **bind_params)
    else:  # pragma: no cover
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def scan_layout(params: dict[str, Any]) -> tuple[int, int]:
    """`(num_consts, num_carry)` of a scan equation; its remaining inputs are the xs."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


def scan_options(params: dict[str, Any]) -> dict[str, Any]:
    """The `lax.scan` keyword arguments (`length`, `reverse`, `unroll`) of a scan equation."""
    return {"length": params["length"], "reverse": params["reverse"], "unroll": params["unroll"]}


def checkpoint_options(params: dict[str, Any]) -> dict[str, Any]:
    """The `jax.checkpoint` keyword arguments of a checkpoint equation."""
    return {"prevent_cse": params.get("prevent_cse", True), "policy": params.get("policy")}


def is_literal(atom: Any) -> bool:
    """Whether a jaxpr atom is a `Literal` (scalars arrive as literals, not `Var`s)."""
    return isinstance(atom, jax.extend.core.Literal)


def as_array(value: Any) -> Any:
    """An output of `eval_jaxpr` as the array it stands for. A `Literal` output evaluates to its
    `.val`, a Python scalar or one of JAX's private `TypedFloat`/`TypedInt`/`TypedNdArray`, and a
    constvar or input to whatever was given (a NumPy array); `jnp.asarray` keeps the jaxpr's dtype
    and weak type (checked for each scalar kind on 0.10 and 0.12 by `tests/test_outputs.py`)."""
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def jax_nn_custom_jvp_name(eqn: Any) -> str | None:
    """For a `custom_jvp_call` of a `jax.nn` function (e.g. `jax.nn.relu`), that function's name.

    The name is read from the traced function's debug info (`"relu at .../jax/_src/nn/..."`),
    and only trusted when the function is defined inside `jax.nn`.
    """
    if eqn.primitive is not _primitives.custom_jvp_call_p:
        return None
    info = getattr(eqn.params.get("call_jaxpr"), "debug_info", None)
    source = getattr(info, "func_src_info", None) or ""
    name, _, where = source.partition(" at ")
    normalised = where.replace("\\", "/")
    return name if "jax/_src/nn/" in normalised else None


def bind_elementwise(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Binds an elementwise equation without re-entering its trace-time context.

    The context may hold the mesh the function was traced under (`Auto` axes); re-entered inside
    a `shard_map` (`Manual` axes), as the fused kernel's per-shard body is, JAX refuses it.
    Elementwise primitives do not depend on the mesh, so their context is not needed.
    """
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]

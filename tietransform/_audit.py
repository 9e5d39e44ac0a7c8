"""Trace-time audits of a tied function: members it never reads, parameters it captures by closure.

A function that reads a model captured by closure instead of its `params` argument never reads the
packed buffers, so its tied gradient is zero. What the traced jaxpr tells us:

- which members are read (`live_inputs` of their invars);
- the constants it closes over: the top-level consts and those of every inner closed jaxpr (an
  inner `jit` keeps its own on some JAX versions), plus any array literal.

The rules, in order:

1. A member unread (any member: a function may read `blocks[0]` from its argument and the other
   blocks from a closed-over model), and a non-uniform constant with the shape and dtype of one
   of its arrays: a closure. This holds whether or not the packed leaves are tracers (under
   `jit`, `grad`, `vmap`, ... nothing else is known). Uniform constants (`jnp.zeros(d)`, masks)
   are skipped: they match zero biases by chance, while a captured model carries its weights.
2. Eagerly (concrete packed leaves), any unread member and a constant equal to a packed array, by
   identity or by value (uniform arrays excepted): a closure.
3. Otherwise each unread member gets an `UnreadMemberWarning`.
"""

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core
import numpy as np

from . import _compat
from ._errors import UnreadMemberWarning, format_type
from ._resolve import Plan
from ._rewrite import live_inputs


def audit_reads(
    fn_name: str,
    plan: Plan,
    jaxpr: Any,
    consts: Sequence[Any],
    leaves: Sequence[Any],
    leaf_of_invar: Sequence[int],
) -> None:
    """Raises `ValueError` on parameters captured by closure; warns on members never read.

    `jaxpr` is the traced function with one invar per parameter array (the first
    `len(leaf_of_invar)` invars, invar `k` standing for flat leaf `leaf_of_invar[k]`), `consts`
    its top-level constants and `leaves` the packed leaves it was called with.
    """
    read = live_inputs(jaxpr)
    read_leaves = {leaf for leaf, r in zip(leaf_of_invar, read, strict=False) if r}
    leaf_types = {
        leaf: (tuple(v.aval.shape), np.dtype(v.aval.dtype))
        for leaf, v in zip(leaf_of_invar, jaxpr.invars, strict=False)
    }
    unread = [
        (group, member)
        for group in plan.groups
        for member in group.members
        if (arrays := [i for i in member.leaves if i in leaf_types])
        and not any(i in read_leaves for i in arrays)
    ]
    if not unread:
        return
    captured = [*consts, *_inner_constants(jaxpr)]
    _refuse_unread_members_beside_lookalikes(fn_name, plan, unread, captured, leaf_types)
    equal = _equal_to_packed(captured, leaves, plan.paths)
    if equal:
        raise ValueError(
            f"`{fn_name}` reads parameters captured by closure instead of its `params` argument: "
            f"it never reads {', '.join(m.path for _, m in unread[:3])}"
            f"{' ...' if len(unread) > 3 else ''}, and it closes over arrays equal to "
            f"{', '.join(equal[:3])}. {_FIX}"
        )
    for group, member in unread:
        warnings.warn(
            f"Member {member.path} of tie group {group.name!r} is never read by `{fn_name}`. "
            "Check the declaration, or that the function reads its parameters from its first "
            "argument (not from a closure).",
            UnreadMemberWarning,
            stacklevel=4,
        )


_FIX = (
    "Read every parameter from the first argument, e.g. `def loss(model, x): return model(x)`, "
    "not a model defined outside the function."
)


def _refuse_unread_members_beside_lookalikes(
    fn_name: str,
    plan: Plan,
    unread: Sequence[tuple[Any, Any]],
    captured: Sequence[Any],
    leaf_types: dict[int, tuple[tuple[int, ...], np.dtype]],
) -> None:
    """Rule 1: an unread member beside a non-uniform constant shaped like one of its arrays."""
    for group, member in unread:
        for leaf in member.leaves:
            if leaf not in leaf_types:
                continue
            const = _lookalike(captured, *leaf_types[leaf])
            if const is None:
                continue
            read = [m.path for m in group.members if m.path not in {u.path for _, u in unread}]
            others = f" (it reads {_few(read)})" if read else " (it reads no member of the group)"
            raise ValueError(
                f"`{fn_name}` reads parameters captured by closure instead of its `params` "
                f"argument: it never reads {plan.paths[leaf]}, a member of tie group "
                f"{group.name!r}{others}, and it closes over a constant "
                f"{format_type(*leaf_types[leaf])}, the shape and dtype of {plan.paths[leaf]}. "
                f"{_FIX} If the member is meant to go unread and the constant is unrelated, "
                "remove the member from the spec or pass `tt.tie(fn, spec, audit=False)`."
            )


def _few(paths: Sequence[str]) -> str:
    return ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")


def _lookalike(captured: Sequence[Any], shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """The first non-uniform constant of type `shape`/`dtype` (tracers count: values unknown)."""
    for const in captured:
        aval = _aval(const)
        if aval is None or tuple(aval.shape) != shape or np.dtype(aval.dtype) != dtype:
            continue
        if isinstance(const, jax.core.Tracer) or not _is_uniform(np.asarray(const)):
            return const
    return None


def _aval(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return jax.typeof(x) if isinstance(x, jax.Array) else np.asarray(x)
    return None


def _inner_constants(jaxpr: Any) -> Iterator[Any]:
    """Constants of the closed jaxprs nested in `jaxpr`'s equations, and its array literals."""
    for eqn in jaxpr.eqns:
        for atom in eqn.invars:
            if _compat.is_literal(atom) and np.ndim(atom.val) > 0:
                yield atom.val
        for value in eqn.params.values():
            for inner in value if isinstance(value, list | tuple) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    open_jaxpr, consts = _compat.split_jaxpr(inner)
                    yield from consts
                    yield from _inner_constants(open_jaxpr)


def _equal_to_packed(
    consts: Sequence[Any], leaves: Sequence[Any], paths: Sequence[str]
) -> list[str]:
    """Rule 2: paths of concrete packed arrays that also appear, by identity or by value, among
    the consts. Uniform arrays (e.g. zero biases) are skipped: an unrelated `jnp.zeros(d)` equals
    them by chance, which says nothing about a closure."""
    found = []
    concrete = [
        (i, x)
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array | np.ndarray) and not isinstance(x, jax.core.Tracer)
    ]
    for const in consts:
        if isinstance(const, jax.core.Tracer) or not hasattr(const, "shape"):
            continue
        for i, leaf in concrete:
            if const is leaf or (
                const.shape == leaf.shape
                and const.dtype == leaf.dtype
                and not _is_uniform(np.asarray(leaf))
                and np.array_equal(np.asarray(const), np.asarray(leaf))
            ):
                found.append(paths[i])
                break
    return found


def _is_uniform(a: np.ndarray) -> bool:
    return a.size == 0 or bool(np.all(a == a.flat[0]))

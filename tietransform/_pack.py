"""`pack` and `unpack`: between a full model and its deduplicated (packed) pytree."""

from typing import Any, TypeVar

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from . import _compat
from ._errors import describe_leaf, leaf_type
from ._layout import (
    FullLayout,
    full_layout,
    full_leaves,
    packed_layout,
    record_holders,
    stack_record_layout,
    tie_layouts,
)
from ._lowrank import accumulation_dtype, init_factors
from ._placeholders import RelaxedLeaf, StackedLeaf, TiedLeaf
from ._record import fingerprint, new_record, record_lead
from ._resolve import Plan, flatten, plan_for
from ._spec import TieSpec


PyTree = TypeVar("PyTree")


def pack(
    params: PyTree, spec: TieSpec, *, require_equal: bool = False, copy: bool = True
) -> PyTree:
    """Deduplicate `params`: keep one buffer per tied leaf.

    **Arguments:**

    - `params`: the full model: an Equinox module or any pytree (dicts, lists, ...). Non-array
      leaves are kept as they are.
    - `spec`: the [`tietransform.TieSpec`][] naming the groups.
    - `require_equal`: if `True`, refuse members whose values differ from their group's canonical
      value (through its view), e.g. when re-tying a checkpoint that was saved untied. Needs
      concrete arrays (call it outside `jit`).
    - `copy`: copy the kept arrays, so that donating the packed pytree cannot delete buffers the
      original model still holds. Pass `False` to share buffers and save memory.

    A group declared with `init="average"` stores the elementwise mean of its members (its
    slices, for a stack) at the canonical member's place, as when a pretrained untied model is
    converted into a shared one (floating point leaves; integer and bool leaves keep the
    canonical value); the others store the canonical member's value.

    **Returns:**

    A pytree of the same type. Each group's canonical leaves keep their values; every other member
    leaf becomes a [`tietransform.TiedLeaf`][], and each stacked array with tied slices becomes a
    [`tietransform.StackedLeaf`][] holding only its distinct slices. `jax.tree.leaves` of the
    result therefore lists one array per buffer (every leaf the full model has, less the tied
    members), and so do gradients, optimizer states and checkpoints made from it, plus one
    zero-size float32 *layout record* per tie group and per stacked array (no bytes; its shape
    fingerprints the layout, so that params loaded under another spec are refused; see the
    checkpoints guide). A `TieSpec()` without groups packs nothing: the result equals `params`.

    **Raises:**

    `ValueError` naming the paths, shapes and dtypes involved when the spec does not fit the
    model: a pattern that matches nothing, overlapping groups, members of different structure,
    shape, dtype or weak type, non-array members, a view whose output does not fit its member.
    """
    flat = flatten(params)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    layout = full_layout(plan, leaves)
    averaged = {n for n, d in spec.groups.items() if getattr(d, "init", None) == "average"}
    if require_equal and averaged:
        raise ValueError(
            f"tt.pack: require_equal=True checks that members already hold their group's value, "
            f"but groups {sorted(averaged)} are declared with init='average', which stores the "
            "members' mean. Drop one of the two."
        )
    relaxed = sorted(n for n, d in spec.groups.items() if getattr(d, "relax", None) is not None)
    if require_equal and relaxed:
        raise ValueError(
            f"tt.pack: require_equal=True checks that members already hold their group's value, "
            f"but groups {relaxed} are relaxed (tt.relaxed): each member keeps its own "
            "W + B @ A, so members may differ. Drop one of the two."
        )
    if require_equal:
        _check_equal(plan, layout, leaves)
    out = [_copy(x) if copy else x for x in leaves]
    for slot in (*layout.slots, *layout.relaxed):
        if slot.group in averaged:
            members = [slot.canonical, *slot.readers]
            out[slot.canonical] = _mean([leaves[i] for i in members])
    layouts = tie_layouts(plan)
    holders = record_holders(layout.slots, layout.relaxed)
    for slot in layout.relaxed:
        _pack_relaxed(plan, slot, leaves, out, layouts[slot.group], holders)
    for slot in layout.slots:
        source, group_layout = plan.paths[slot.canonical], layouts[slot.group]
        for reader in slot.readers:
            record = None
            if holders.get(slot.group) == reader:
                lead = record_lead(leaf_type(leaves[slot.canonical])[0])
                record = new_record(fingerprint(group_layout), lead)
            out[reader] = TiedLeaf(
                slot.group,
                source,
                *leaf_type(leaves[reader]),
                layout=group_layout,
                record=record,
            )
    for leaf, stack in layout.stacks.items():
        try:
            data = _take_rows(leaves[leaf], stack.kept)
        except _compat.SHARDING_TYPE_ERROR as error:
            raise ValueError(
                f"tt.pack cannot gather the kept slices {list(stack.kept)} of {plan.paths[leaf]} "
                f"({describe_leaf(leaves[leaf])}): it is sharded along its stacked axis under an "
                "explicit mesh, and the kept slices need not divide over that axis. Pack the "
                "model before sharding that axis and shard the StackedLeaf's data afterwards, or "
                f"replicate the stacked axis. ({type(error).__name__}: {error})"
            ) from error
        for name in stack.groups:
            if name in averaged:
                tied = stack.slices[name]
                row = stack.rows[tied[0]]
                rows = [leaves[leaf][i] for i in tied]
                data = data.at[row].set(_mean(rows))
        recorded = stack_record_layout(stack)
        factors: dict[str, Any] = {}
        if stack.factor_rows is not None:
            factors = _stacked_factors(leaves[leaf], data, stack, leaf)
        out[leaf] = StackedLeaf(
            data,
            stack.rows,
            stack.groups,
            leaf_type(leaves[leaf])[2],
            layout=recorded,
            record=new_record(fingerprint(recorded), len(stack.kept)),
            factor_rows=stack.factor_rows,
            **factors,
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _pack_relaxed(
    plan: Plan,
    slot: Any,
    leaves: list[Any],
    out: list[Any],
    layout: Any,
    holders: dict[str, int],
) -> None:
    """Stores a relaxed matrix: the shared `W` (already in `out[slot.canonical]`) on the
    canonical member's `RelaxedLeaf`, and each member's factors of its residual `W_l - W`."""
    members = (slot.canonical, *slot.readers)
    shared = out[slot.canonical]
    shape, dtype, _ = leaf_type(shared)
    residuals = jnp.stack([jnp.asarray(leaves[i], dtype) - shared for i in members])
    b, a = init_factors(residuals, slot.relax, members[0], dtype)
    source = plan.paths[slot.canonical]
    for position, member in enumerate(members):
        record = None
        if holders.get(slot.group) == member:
            record = new_record(fingerprint(layout), record_lead(shape))
        out[member] = RelaxedLeaf(
            shared if member == slot.canonical else None,
            b[position],
            a[position],
            slot.group,
            source,
            *leaf_type(leaves[member]),
            layout=layout,
            record=record,
        )


def _stacked_factors(full: Any, data: Any, stack: Any, salt: int) -> dict[str, Any]:
    """The factors of a relaxed stack: one row per relaxed slice `i`, from its residual
    `full[i] - data[rows[i]]`."""
    assert stack.factor_rows is not None
    slices = [i for i, f in enumerate(stack.factor_rows) if f >= 0]
    (relax,) = {s.relax for s in stack.relaxed.values()}
    dtype = leaf_type(data)[1]
    index = np.asarray(slices, np.int32)
    rows = np.asarray([stack.rows[i] for i in slices], np.int32)
    residuals = jnp.take(jnp.asarray(full), index, axis=0) - jnp.take(data, rows, axis=0)
    b, a = init_factors(residuals, relax, salt, dtype)
    return {"lora_b": b, "lora_a": a}


def unpack(packed: PyTree, spec: TieSpec) -> PyTree:
    """Rebuild the full model from a packed pytree.

    **Arguments:**

    - `packed`: packed params: the output of [`tietransform.pack`][], or params of the same
      structure such as an updated or loaded model. For gradients and optimizer updates use
      [`tietransform.unpack_grads`][]: `unpack` applies each view's function, offset included, to
      what it is given (a `w + 1` view would turn a gradient `g` into `g + 1`).
    - `spec`: the same [`tietransform.TieSpec`][] it was packed with.

    **Returns:**

    The full model: every member of a plain tie holds its group's canonical array (the same
    object), view members hold `fn(canonical)`, stacked arrays are whole again.

    **Raises:**

    `ValueError` if `packed` does not have the structure that `pack(params, spec)` produces, if
    it was packed under another layout (its layout records say so, e.g. a checkpoint saved under
    another spec), or if it was restored without a target (its placeholders became dicts).
    """
    flat = flatten(packed)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    layout = packed_layout(plan, leaves)
    return jax.tree_util.tree_unflatten(treedef, full_leaves(plan, layout, leaves))


def _copy(x: Any) -> Any:
    """A copy of a concrete array, made by the runtime (no program is compiled for it)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, may_alias=False)  # committed to a device if `x` was
    return x


def _on_one_cpu(x: Any) -> bool:
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and len(x.sharding.device_set) == 1
        and next(iter(x.sharding.device_set)).platform == "cpu"
    )


def _take_rows(x: Any, kept: tuple[int, ...]) -> Any:
    """`x[kept]`, the kept slices of a stacked array. On one CPU device the rows are gathered
    in host memory (a view of the same buffer) and put back, as compiling a gather costs tens of
    milliseconds per shape; elsewhere (accelerators, sharded arrays, tracers) `jnp.take`."""
    if _on_one_cpu(x) and not leaf_type(x)[2]:  # a host copy would lose the weak type
        rows = np.asarray(x)[np.asarray(kept)]
        return jax.device_put(rows, x.sharding if x.committed else None)
    return jnp.take(x, np.asarray(kept, dtype=np.int32), axis=0)


def _mean(xs: list[Any]) -> Any:
    """The elementwise mean of the members `xs` (the canonical first), accumulated in at least
    float32 and returned in their dtype; integer and bool leaves keep the canonical value."""
    dtype = leaf_type(xs[0])[1]
    if not jnp.issubdtype(dtype, jnp.inexact):
        return xs[0]  # integer and bool leaves (counters, masks) keep the canonical value
    accumulate = accumulation_dtype(dtype)
    total = sum(jnp.asarray(x, accumulate) for x in xs)
    return (total / len(xs)).astype(dtype)


def _concrete(x: Any, path: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except jax.errors.JAXTypeError as error:  # a tracer
        raise ValueError(
            f"pack(..., require_equal=True) needs concrete arrays, but {path} is traced. Call "
            "`tt.pack` outside `jax.jit`, or drop `require_equal`."
        ) from error


def _has_nan(x: np.ndarray) -> bool:
    """Whether `x`'s dtype has NaN (float, complex, and the ml_dtypes floats such as bfloat16)."""
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _check_equal(plan: Plan, layout: FullLayout, leaves: list[Any]) -> None:
    for slot in layout.slots:
        source = leaves[slot.canonical]
        expect = _concrete(
            source if slot.fn is None else slot.fn(source), plan.paths[slot.canonical]
        )
        for reader in slot.readers:
            got = _concrete(leaves[reader], plan.paths[reader])
            if not np.array_equal(got, expect, equal_nan=_has_nan(expect)):
                diff = np.max(np.abs(got.astype(np.float64) - expect.astype(np.float64)))
                relation = "" if slot.fn is None else " (through its view)"
                raise ValueError(
                    f"Members of tie group {slot.group!r} hold different values: "
                    f"{plan.paths[reader]} differs from {plan.paths[slot.canonical]}{relation} by "
                    f"up to {diff:.3g}. Drop `require_equal=True` to keep the canonical value, or "
                    "fix the checkpoint."
                )
    for leaf, stack in layout.stacks.items():
        array = _concrete(leaves[leaf], plan.paths[leaf])
        for i, row in enumerate(stack.rows):
            kept = stack.kept[row]
            if not np.array_equal(array[i], array[kept], equal_nan=_has_nan(array)):
                raise ValueError(
                    f"Slices of {plan.paths[leaf]} tied by tt.stack hold different values: "
                    f"slice {i} differs from slice {kept}. Drop `require_equal=True` to keep the "
                    "canonical slice."
                )


def is_packed_like(tree: Any) -> bool:
    """Whether `tree` contains placeholders (is packed rather than full)."""
    _, leaves, _ = flatten(tree)
    return any(isinstance(x, TiedLeaf | StackedLeaf | RelaxedLeaf) for x in leaves)

"""Checking leaves against a plan, and computing full leaves from packed ones.

`full_layout` checks a full (unpacked) model against a plan and says what `pack` stores;
`packed_layout` checks a packed pytree and says how `unpack` and `tie` rebuild every member.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import describe_leaf, format_type, leaf_type
from ._lowrank import check_rank, delta, is_relaxable, stacked_deltas
from ._placeholders import (
    RelaxedLeaf,
    StackedLeaf,
    TiedLeaf,
    is_placeholder,
    is_restored_placeholder,
)
from ._record import (
    RECORD_NDIM,
    Layout,
    fingerprint,
    fingerprint_of_record,
    fn_name,
    format_layout,
    record_bits,
    record_of,
    record_shape,
    relaxed_layout,
    stack_layout,
    tie_layout,
)
from ._resolve import Plan, StackSlot, TieSlot


_REPACK = "Pack the params with `tt.pack(params, spec)`, using the same spec you pass here."
_CONVERT = (
    "To use params packed under another spec with this one, convert them: "
    "`tt.pack(tt.unpack(params, old_spec), new_spec)`."
)


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """How one stacked leaf is stored: full slice `i` is row `rows[i]` of the kept slices `kept`."""

    kept: tuple[int, ...]
    rows: tuple[int, ...]
    groups: tuple[str, ...]
    slices: dict[str, tuple[int, ...]]
    relaxed: dict[str, StackSlot] = dataclasses.field(default_factory=dict)
    """The relaxed groups (`tt.relaxed`) on this array: each of their slices has a delta."""

    @property
    def factor_rows(self) -> tuple[int, ...] | None:
        """Slice `i`'s row of the factors (`-1`: no delta); `None` when nothing is relaxed."""
        if not self.relaxed:
            return None
        relaxed = sorted(i for g in self.relaxed for i in self.slices[g])
        return tuple(relaxed.index(i) if i in relaxed else -1 for i in range(len(self.rows)))


@dataclasses.dataclass(frozen=True)
class FullLayout:
    """What `pack` stores for a full model: the tie slots that hold arrays (strict ones in
    `slots`, relaxed matrices in `relaxed`), and the stacks."""

    slots: tuple[TieSlot, ...]
    stacks: dict[int, StackLayout]
    relaxed: tuple[TieSlot, ...] = ()


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """How to rebuild a full model from packed leaves; `stacks` maps each stacked leaf's index
    to its layout. `mapped` maps each tie group to the number of leading axes its placeholders
    have and its buffers lack: 1 inside `jax.vmap` over packed params (an ensemble), else 0."""

    slots: tuple[TieSlot, ...]
    stacks: dict[int, StackLayout]
    mapped: dict[str, int] = dataclasses.field(default_factory=dict)
    relaxed: tuple[TieSlot, ...] = ()


def record_holders(slots: Sequence[TieSlot], relaxed: Sequence[TieSlot] = ()) -> dict[str, int]:
    """The leaf that holds each tie group's layout record: the group's first placeholder (a
    reader of its first slot, strict slots before relaxed ones)."""
    holders: dict[str, int] = {}
    for slot in (*slots, *relaxed):
        if slot.readers:
            holders.setdefault(slot.group, slot.readers[0])
    return holders


def _is_cast(packed: np.dtype, now: np.dtype) -> bool:
    """Whether a buffer packed as `packed` and now `now` was cast between float dtypes (as
    mixed-precision code casts whole packed trees); members then read the cast buffer."""
    return bool(jnp.issubdtype(packed, jnp.floating) and jnp.issubdtype(now, jnp.floating))


_RESIZE = (
    "If you resized a tied buffer (e.g. an embedding grown to a new vocabulary), resize the full "
    "model instead and pack it again: `full = tt.unpack(packed, spec)`, edit `full` (every "
    "member), then `tt.pack(full, spec)`."
)
_CAST_INSIDE = (
    "Casting packed params is supported between float dtypes only; for any other cast, cast "
    "inside the tied function (e.g. `jax.tree.map(lambda a: a.astype(dtype), model)` as its "
    "first line)."
)


def _types_listing(plan: Plan, leaves: Sequence[Any], indices: Sequence[int]) -> str:
    width = max(len(plan.paths[i]) for i in indices)
    return "\n".join(f"  {plan.paths[i]:<{width}}  {describe_leaf(leaves[i])}" for i in indices)


def _slot_kind(plan: Plan, slot: TieSlot, leaves: Sequence[Any]) -> str | None:
    """Checks one slot of a full model: `"strict"`, `"relaxed"` (a matrix of a relaxed group),
    or `None` for a slot left alone (no arrays; a non-matrix of a relaxed group with
    `others="own"`)."""
    if not _check_slot(plan, slot, leaves):
        return None
    if slot.relax is None:
        return "strict"
    shape, dtype, _ = leaf_type(leaves[slot.canonical])
    if not is_relaxable(shape, dtype, stacked=False):
        return "strict" if slot.relax.others == "shared" else None
    check_rank(slot.relax, slot.group, plan.paths[slot.canonical], shape)
    return "relaxed"


def _check_slot(plan: Plan, slot: TieSlot, leaves: Sequence[Any]) -> bool:
    """Checks one slot of a full model; returns whether it ties arrays (else it is left alone)."""
    indices = (slot.canonical, *slot.readers)
    arrays = [eqx.is_array(leaves[i]) for i in indices]
    if not any(arrays) and not slot.member_is_leaf:
        return False  # e.g. an activation function inside a tied MLP: not a parameter.
    if not all(arrays):
        raise ValueError(
            f"Tie group {slot.group!r} contains non-array leaves; only arrays can be tied:\n"
            f"{_types_listing(plan, leaves, indices)}\n"
            "Select array leaves (or subtrees whose arrays line up) in the declaration."
        )
    source = leaf_type(leaves[slot.canonical])
    want = source if slot.fn is None else _view_type(plan, slot, source)
    wrong = [r for r in slot.readers if leaf_type(leaves[r]) != want]
    if not wrong:
        return True
    weak = all(leaf_type(leaves[r])[:2] == want[:2] for r in wrong)
    weak_hint = (
        "They differ only in weak type; create the arrays with an explicit dtype "
        "(e.g. `jnp.asarray(x, jnp.float32)`)."
    )
    if slot.fn is None:
        raise ValueError(
            f"Members of tie group {slot.group!r} must have the same shape and dtype. Got:\n"
            f"{_types_listing(plan, leaves, indices)}\n"
            + (
                weak_hint
                if weak
                else "Declare a view (e.g. `tt.view(src, dst, jnp.transpose)`) if a transform "
                "is intended."
            )
        )
    raise ValueError(
        f"Members of tie group {slot.group!r} must fit the output of its view: "
        f"{fn_name(slot.fn)}({plan.paths[slot.canonical]}) gives {format_type(*want)} (from "
        f"{format_type(*source)}), but the members are:\n{_types_listing(plan, leaves, wrong)}\n"
        + (
            weak_hint
            if weak
            else "Fix the view's function so that it returns each member's shape and dtype, or "
            "select other members."
        )
    )


def _view_type(
    plan: Plan, slot: TieSlot, source: tuple[Any, ...]
) -> tuple[tuple[int, ...], np.dtype, bool]:
    shape, dtype, weak = source
    assert slot.fn is not None
    try:
        out = jax.eval_shape(slot.fn, jax.ShapeDtypeStruct(shape, dtype, weak_type=weak))
    except Exception as error:
        raise ValueError(
            f"The function of view {slot.group!r} fails on {plan.paths[slot.canonical]} "
            f"({format_type(shape, dtype, weak)}): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(
            f"The function of view {slot.group!r} must return one array, got "
            f"{jax.tree_util.tree_structure(out)}."
        )
    return tuple(out.shape), np.dtype(out.dtype), bool(out.weak_type)


def _stack_layouts(plan: Plan, leaves: Sequence[Any]) -> dict[int, StackLayout]:
    layouts = {}
    for leaf, stacks in _stacks_by_leaf(plan).items():
        x = leaves[leaf]
        path = plan.paths[leaf]
        if not eqx.is_array(x):
            continue  # a non-array leaf inside a stacked subtree (plan_for refuses it as a member)
        if not leaf_type(x)[0]:
            raise ValueError(
                f"tt.stack group {stacks[0].group!r} selects {path} ({describe_leaf(x)}), which is "
                "not a stacked array; stacked ties need an array with a leading axis."
            )
        shape, dtype, _ = leaf_type(x)
        stacks = _kept_stack_slots(stacks, shape, dtype)
        if stacks:
            layouts[leaf] = _stack_layout(stacks, path, shape[0], shape)
    return layouts


def _kept_stack_slots(
    stacks: Sequence[StackSlot], shape: tuple[int, ...], dtype: Any
) -> list[StackSlot]:
    """The stack slots that tie this array: a relaxed group ties a non-matrix array strictly
    (`others="shared"`) or not at all (`others="own"`)."""
    relaxable = is_relaxable(shape, dtype, stacked=True)
    kept = []
    for stack in stacks:
        if stack.relax is not None and not relaxable:
            if stack.relax.others == "own":
                continue
            stack = dataclasses.replace(stack, relax=None)
        kept.append(stack)
    return kept


def _stacks_by_leaf(plan: Plan) -> dict[int, list[StackSlot]]:
    by_leaf: dict[int, list[StackSlot]] = {}
    for stack in plan.stacks:
        by_leaf.setdefault(stack.leaf, []).append(stack)
    return by_leaf


def _stack_layout(
    stacks: Sequence[StackSlot], path: str, length: int, shape: tuple[int, ...] = ()
) -> StackLayout:
    """How the stacked array at `path`, with leading axis `length`, is stored under `stacks`."""
    ranks = {s.relax.rank for s in stacks if s.relax is not None}
    if len(ranks) > 1:
        raise ValueError(
            f"Relaxed tie groups {[s.group for s in stacks if s.relax is not None]} on {path} "
            f"have different ranks {sorted(ranks)}; the slices of one stacked array share one "
            "rank. Give them the same `tt.relaxed(rank)`."
        )
    for stack in stacks:
        if stack.relax is not None:
            check_rank(stack.relax, stack.group, path, shape)
    source = list(range(length))
    slices: dict[str, tuple[int, ...]] = {}
    claimed: dict[int, str] = {}
    for stack in stacks:
        if stack.length is not None and stack.length != length:
            raise ValueError(
                f"tt.stack group {stack.group!r} shares {stack.length} layers, but {path} has "
                f"{length} along its stacked axis. Pass `layers={length}` to `tt.share_layers` "
                "(or select the stack it should share)."
            )
        normal = _normalise_slices(stack, path, length)
        for i in normal:
            if i in claimed:
                raise ValueError(
                    f"Tie groups {claimed[i]!r} and {stack.group!r} overlap at {path}[{i}]. "
                    "A slice can belong to one group only."
                )
            claimed[i] = stack.group
        if stack.canonical is not None and not -length <= stack.canonical < length:
            raise ValueError(
                f"tt.stack group {stack.group!r}: canonical slice {stack.canonical} is out of "
                f"range for {path}, whose leading axis has length {length}."
            )
        canonical = normal[0] if stack.canonical is None else stack.canonical % length
        if canonical not in normal:
            raise ValueError(
                f"tt.stack group {stack.group!r}: canonical slice {stack.canonical} is not one "
                f"of the tied slices {list(normal)} of {path}."
            )
        for i in normal:
            source[i] = canonical
        slices[stack.group] = normal
    kept = tuple(sorted(set(source)))
    rows = tuple(kept.index(s) for s in source)
    relaxed = {s.group: s for s in stacks if s.relax is not None}
    return StackLayout(kept, rows, tuple(s.group for s in stacks), slices, relaxed)


def _normalise_slices(stack: StackSlot, path: str, length: int) -> tuple[int, ...]:
    if stack.slices is None:  # all slices; a length-1 stack is trivially tied (models for any n)
        return tuple(range(length))
    bad = [s for s in stack.slices if not -length <= s < length]
    if bad:
        raise ValueError(
            f"tt.stack group {stack.group!r}: slices {bad} are out of range for {path}, whose "
            f"leading axis has length {length}."
        )
    normal = tuple(sorted(s % length for s in stack.slices))
    if len(set(normal)) != len(normal):
        raise ValueError(
            f"tt.stack group {stack.group!r} names the same slice twice: {list(stack.slices)} "
            f"on an axis of length {length}."
        )
    return normal


def full_layout(plan: Plan, leaves: Sequence[Any]) -> FullLayout:
    """Checks a full model's leaves against `plan`; raises `ValueError` naming what is wrong."""
    refuse_restored_without_target(plan, leaves)
    for path, leaf in zip(plan.paths, leaves, strict=True):
        if is_placeholder(leaf):
            raise ValueError(
                f"These params are already packed ({path} is {leaf!r}); pass them to "
                "`tt.unpack` or to the tied function instead."
            )
    kinds = [_slot_kind(plan, slot, leaves) for slot in plan.slots]
    slots = tuple(slot for slot, kind in zip(plan.slots, kinds, strict=True) if kind == "strict")
    relaxed = tuple(s for s, kind in zip(plan.slots, kinds, strict=True) if kind == "relaxed")
    return FullLayout(slots, _stack_layouts(plan, leaves), relaxed)


def _show(leaf: Any) -> str:
    return repr(leaf) if is_placeholder(leaf) else describe_leaf(leaf)


def tie_layouts(plan: Plan) -> dict[str, Layout]:
    """The layout of each plain tie and view group of `plan`, as its placeholders record it."""
    fns = {slot.group: slot.fn for slot in plan.slots}
    return {
        g.name: tie_layout(
            g.kind,
            g.name,
            [m.path for m in g.members],
            g.canonical.path,
            fns.get(g.name),
            None if g.relax is None else relaxed_layout(g.relax.rank, g.relax.others),
        )
        for g in plan.groups
        if g.kind != "stack"
    }


def stack_record_layout(stack: StackLayout) -> Layout:
    """The layout a `StackedLeaf` packed as `stack` records."""
    kept = {g: stack.kept[stack.rows[tied[0]]] for g, tied in stack.slices.items()}
    relaxed = {
        g: relaxed_layout(s.relax.rank, s.relax.others)
        for g, s in stack.relaxed.items()
        if s.relax is not None
    }
    return stack_layout(len(stack.rows), stack.slices, kept, relaxed)


def refuse_restored_without_target(plan: Plan, leaves: Sequence[Any]) -> None:
    """Raises if placeholders became plain dicts, as in a checkpoint restored without a target."""
    restored = [i for i, x in enumerate(leaves) if is_restored_placeholder(x)]
    if restored:
        paths = ", ".join(plan.paths[i] for i in restored[:3])
        raise ValueError(
            f"These params were restored without a target: {paths}"
            f"{' ...' if len(restored) > 3 else ''} "
            f"{'is a plain dict' if len(restored) == 1 else 'are plain dicts'} "
            f"(keys {sorted(leaves[restored[0]])}) where packing put a TiedLeaf or StackedLeaf, "
            "so the tie layout is gone. Restore the checkpoint into a packed target instead, e.g. "
            "`checkpointer.restore(path, target)` with `target` built by "
            "`tt.pack(new_model(), spec)` (see the checkpoints guide)."
        )


def _packed_under(leaves: Sequence[Any], expected: Sequence[Layout]) -> str:
    """Both layouts, for messages: what the placeholders record, and what the spec makes."""
    found = list(
        dict.fromkeys(
            format_layout(x.layout)
            for x in leaves
            if isinstance(x, TiedLeaf | StackedLeaf | RelaxedLeaf) and x.layout is not None
        )
    )
    shown = "; ".join(found[:3]) + (" ..." if len(found) > 3 else "")
    return (
        f"\n  packed under: {shown or 'no recorded layout'}"
        f"\n  this spec:    {'; '.join(dict.fromkeys(format_layout(x) for x in expected))}\n"
    )


def _mapped_axes(record: Any) -> int:
    """How many leading axes a record (and so its group's buffers) lost: 1 inside `jax.vmap`."""
    shape = record_of(record)
    return RECORD_NDIM - len(shape) if shape is not None and len(shape) < RECORD_NDIM else 0


def _check_record(path: str, value: TiedLeaf | StackedLeaf | RelaxedLeaf, expected: Layout) -> None:
    """Raises unless the layout record of `value` (data, e.g. from a file) is `expected`'s."""
    found = record_of(value.record)
    want = record_bits(expected)
    if found is not None and len(found) in (RECORD_NDIM, RECORD_NDIM - 1):
        if fingerprint_of_record(found) == want:
            return
    if found is None:
        raise ValueError(
            f"The packed params have lost a layout record: {path} holds {value!r}, whose record "
            f"(the zero-size array under its key `layout_...`) is {value.record!r}; was it "
            "filtered out before saving? Put the records back from a packed skeleton, e.g. "
            "`eqx.combine(restored, skeleton)`, or pack the params again with "
            "`tt.pack(params, spec)`."
        )
    own = None if value.layout is None else record_bits(value.layout)
    if fingerprint_of_record(found) == own:
        raise ValueError(
            f"The packed params were packed under another layout: {path} was packed under "
            f"{format_layout(value.layout)}; this spec makes it {format_layout(expected)}. "
            f"{_CONVERT}"
        )
    loaded_into = (
        "a skeleton packed under this spec"
        if value.layout == expected
        else f"a skeleton packed under {format_layout(value.layout)}"
    )
    wanted = format_type(record_shape(fingerprint(expected), found[0]), np.float32)
    raise ValueError(
        f"The packed params were packed under another layout: the arrays at {path} carry the "
        f"layout record {format_type(found, np.float32)}, which is not this spec's "
        f"({format_layout(expected)}, record {wanted}). "
        f"They were saved under another spec and loaded into {loaded_into}. Load them into a "
        "skeleton packed under the spec they were saved with, then convert them: "
        "`tt.pack(tt.unpack(params, old_spec), new_spec)`."
    )


def packed_layout(plan: Plan, leaves: Sequence[Any]) -> PackedLayout:
    """Checks packed leaves against `plan`; raises `ValueError` naming what does not match.

    Besides the structure (which leaves are placeholders, what they read), each placeholder's
    layout record must be the one this spec gives it: the record is data, so this catches arrays
    saved under one spec and loaded into a skeleton packed under another. Shapes only: it runs
    at trace time under `jit`.
    """
    refuse_restored_without_target(plan, leaves)
    layouts = tie_layouts(plan)
    slots, relaxed = [], []
    mapped: dict[str, int] = {}
    expected_placeholders: set[int] = set()
    for slot in plan.slots:
        kind = _packed_relaxed_kind(slot, leaves)
        if kind == "relaxed":
            axes = _check_relaxed_slot(plan, slot, leaves, layouts[slot.group])
            mapped.setdefault(slot.group, axes)
            expected_placeholders.update((slot.canonical, *slot.readers))
            relaxed.append(slot)
            continue
        if kind == "own":
            continue
        readers = [leaves[r] for r in slot.readers]
        canonical = leaves[slot.canonical]
        if not any(is_placeholder(r) or eqx.is_array(r) for r in readers):
            if not eqx.is_array(canonical) and not slot.member_is_leaf:
                continue  # a non-array leaf inside tied subtrees, left alone by `pack`.
        source = plan.paths[slot.canonical]
        for reader, value in zip(slot.readers, readers, strict=True):
            if not (
                isinstance(value, TiedLeaf) and value.group == slot.group and value.source == source
            ):
                raise ValueError(
                    f"The packed params do not match the spec: {plan.paths[reader]} holds "
                    f"{_show(value)} where tie group {slot.group!r} expects a TiedLeaf reading "
                    f"{source}.{_packed_under(leaves, [layouts[slot.group]])}{_REPACK} {_CONVERT}"
                )
        if not eqx.is_array(canonical):
            raise ValueError(
                f"The packed params do not match the spec: the canonical leaf {source} of tie "
                f"group {slot.group!r} holds {_show(canonical)}, not an array."
                f"{_packed_under(leaves, [layouts[slot.group]])}{_REPACK} {_CONVERT}"
            )
        if slot.readers and slot.group not in mapped:
            mapped[slot.group] = _mapped_axes(readers[0].record)
        if slot.fn is not None and mapped.get(slot.group):
            _refuse_view_mixing_ensemble_members(plan, slot, canonical)
        if slot.fn is None:
            have = leaf_type(canonical)
            axes = mapped.get(slot.group, 0)
            for reader, value in zip(slot.readers, readers, strict=True):
                # Weak type may differ: optimizers (e.g. optax.apply_updates) drop it from the
                # canonical buffer, as they would from every member of an untied model. A float
                # dtype may differ too: a cast packed tree, whose members read the cast buffer.
                if value.shape[axes:] != have[0] or (
                    value.dtype != have[1] and not _is_cast(value.dtype, have[1])
                ):
                    fix = f"{_REPACK} {_RESIZE}" if value.shape[axes:] != have[0] else _CAST_INSIDE
                    raise ValueError(
                        f"The packed params do not match the spec: {source} "
                        f"is {format_type(*have)} but was packed as "
                        f"{format_type(value.shape, value.dtype, value.weak_type)} (its reader "
                        f"{plan.paths[reader]}). {fix}"
                    )
        expected_placeholders.update(slot.readers)
        slots.append(slot)
    checked = {
        leaf: _check_stacked_leaf(plan.paths[leaf], leaves[leaf], stack_slots)
        for leaf, stack_slots in sorted(_stacks_by_leaf(plan).items())
        if eqx.is_array(leaves[leaf]) or is_placeholder(leaves[leaf])
    }
    stacks = {leaf: stack for leaf, stack in checked.items() if stack is not None}
    expected_placeholders.update(stacks)
    for index, (path, leaf) in enumerate(zip(plan.paths, leaves, strict=True)):
        if is_placeholder(leaf) and index not in expected_placeholders:
            raise ValueError(
                f"The packed params do not match the spec: {path} holds {leaf!r}, but no tie "
                f"group of this spec covers it.{_packed_under(leaves, list(layouts.values()))}"
                f"{_REPACK} {_CONVERT}"
            )
    # The structure fits; now the records (data, e.g. from a file) must be this spec's too.
    for group, holder in record_holders(slots, relaxed).items():
        _check_record(plan.paths[holder], leaves[holder], layouts[group])
    for leaf, stack in stacks.items():
        _check_record(plan.paths[leaf], leaves[leaf], stack_record_layout(stack))
    return PackedLayout(tuple(slots), stacks, mapped, tuple(relaxed))


def _packed_relaxed_kind(slot: TieSlot, leaves: Sequence[Any]) -> str | None:
    """For a slot of a relaxed group: `"relaxed"` for a matrix (its members are
    `RelaxedLeaf`s), `"own"` for a non-matrix kept per member, `None` to check it as a strict
    slot (any slot of a strict group, a non-matrix tied strictly)."""
    if slot.relax is None:
        return None
    canonical = leaves[slot.canonical]
    if isinstance(canonical, RelaxedLeaf):
        shape, dtype = canonical.shape, canonical.dtype
    elif eqx.is_array(canonical):
        shape, dtype, _ = leaf_type(canonical)
    else:
        return None  # a placeholder of another kind, or a non-array: the strict checks refuse it
    if is_relaxable(shape, dtype, stacked=False):
        return "relaxed"
    return "own" if slot.relax.others == "own" else None


def _check_relaxed_slot(plan: Plan, slot: TieSlot, leaves: Sequence[Any], layout: Layout) -> int:
    """Checks the `RelaxedLeaf`s of one relaxed matrix; returns its mapped axes (`jax.vmap`)."""
    assert slot.relax is not None
    source = plan.paths[slot.canonical]

    def refuse(index: int, what: str) -> None:
        raise ValueError(
            f"The packed params do not match the spec: {plan.paths[index]} holds "
            f"{_show(leaves[index])} where relaxed tie group {slot.group!r} expects {what}."
            f"{_packed_under(leaves, [layout])}{_REPACK} {_CONVERT}"
        )

    for index in (slot.canonical, *slot.readers):
        value = leaves[index]
        holds = index == slot.canonical
        want = (
            "a RelaxedLeaf holding the shared W"
            if holds
            else f"a RelaxedLeaf reading W at {source}"
        )
        if not (
            isinstance(value, RelaxedLeaf)
            and value.group == slot.group
            and value.source == source
            and (value.shared is not None) == holds
        ):
            refuse(index, want)
    canonical = leaves[slot.canonical]
    if not eqx.is_array(canonical.shared):
        refuse(slot.canonical, "an array as its shared W")
    holder = leaves[slot.readers[0]] if slot.readers else canonical
    axes = _mapped_axes(holder.record) if slot.readers else 0
    w_shape = leaf_type(canonical.shared)[0]
    m, n = canonical.shape
    rank = slot.relax.rank
    if w_shape[axes:] != (m, n):
        raise ValueError(
            f"The packed params do not match the spec: the shared W of relaxed tie group "
            f"{slot.group!r} at {source} is {describe_leaf(canonical.shared)}, but was packed as "
            f"{format_type((m, n), canonical.dtype)}. {_REPACK} {_RESIZE}"
        )
    for index in (slot.canonical, *slot.readers):
        value = leaves[index]
        for name, want_shape in (("lora_b", (m, rank)), ("lora_a", (rank, n))):
            factor = getattr(value, name)
            if not eqx.is_array(factor) or leaf_type(factor)[0][axes:] != want_shape:
                raise ValueError(
                    f"The packed params do not match the spec: {plan.paths[index]}.{name} is "
                    f"{describe_leaf(factor)}, but relaxed tie group {slot.group!r} (rank "
                    f"{rank}) needs {format_type(want_shape, canonical.dtype)} for the "
                    f"{m}x{n} matrix. {_REPACK} {_CONVERT}"
                )
    return axes


def _refuse_view_mixing_ensemble_members(plan: Plan, slot: TieSlot, canonical: Any) -> None:
    """Under `jax.vmap` of a packed ensemble a view's function sees one member's buffer, where
    `pack` and `unpack` apply it to the whole ensemble. Both agree only if the function keeps a
    leading axis as it is (acts on trailing axes); refuse a function that moves it."""
    shape, dtype, _ = leaf_type(canonical)
    probe = max(shape, default=1) + 1  # a leading axis of a length no other axis has
    try:
        whole = jax.eval_shape(slot.fn, jax.ShapeDtypeStruct((probe, *shape), dtype))
        one = jax.eval_shape(slot.fn, jax.ShapeDtypeStruct(shape, dtype))
        keeps = tuple(whole.shape) == (probe, *one.shape)
    except Exception:
        keeps = False
    if not keeps:
        raise ValueError(
            f"The function {fn_name(slot.fn)} of view {slot.group!r} is mapped over packed "
            f"params (jax.vmap of an ensemble), but it does not act on trailing axes only: "
            f"applied to the whole ensemble, as `tt.pack` and `tt.unpack` apply it, it would "
            f"mix ensemble members, so the two would disagree. Write the view on the trailing "
            f"axes, e.g. `lambda w: jnp.swapaxes(w, -1, -2)` (or `w.mT`) instead of "
            f"`jnp.transpose`, and pack the ensemble again."
        )


def _check_stacked_leaf(path: str, value: Any, stacks: Sequence[StackSlot]) -> StackLayout | None:
    """The layout of `value`; raises unless it is the `StackedLeaf` packing under `stacks` gives.
    `None` for an array that the spec leaves untied (a non-matrix of a relaxed stack with
    `others="own"`)."""
    if isinstance(value, StackedLeaf) and eqx.is_array(value.data):
        full, dtype = (len(value.rows), *leaf_type(value.data)[0][1:]), leaf_type(value.data)[1]
        stacks = _kept_stack_slots(stacks, full, dtype)
    elif eqx.is_array(value) and leaf_type(value)[0]:
        stacks = _kept_stack_slots(stacks, *leaf_type(value)[:2])
    if not stacks:
        return None
    groups = {s.group for s in stacks}
    if not isinstance(value, StackedLeaf) or set(value.groups) != groups:
        raise ValueError(
            f"The packed params do not match the spec: {path} holds "
            f"{_show(value)} where tie groups {sorted(groups)} expect a StackedLeaf. "
            f"{_REPACK} {_CONVERT}"
        )
    full = (len(value.rows), *(leaf_type(value.data)[0][1:] if eqx.is_array(value.data) else ()))
    expected = _stack_layout(stacks, path, len(value.rows), full)
    if value.rows != expected.rows:
        raise ValueError(
            f"The packed params do not match the spec: {path} was packed with other tied slices "
            f"or another canonical slice (slice i reads stored row {list(value.rows)}[i]; this "
            f"spec stores {list(expected.rows)}).\n"
            f"  packed under: {format_layout(value.layout)}\n"
            f"  this spec:    {format_layout(stack_record_layout(expected))}\n{_CONVERT}"
        )
    shape = leaf_type(value.data)[0] if eqx.is_array(value.data) else None
    if not shape or shape[0] != len(expected.kept):
        raise ValueError(
            f"The packed params do not match the spec: {path} holds a StackedLeaf whose data is "
            f"{describe_leaf(value.data)}, but its {len(value.rows)} slices need "
            f"{len(expected.kept)} stored rows (a leading axis of {len(expected.kept)}). "
            f"{_REPACK}"
        )
    _check_stacked_factors(path, value, expected, shape)
    return expected


def _check_stacked_factors(
    path: str, value: StackedLeaf, expected: StackLayout, shape: tuple[int, ...]
) -> None:
    """The factors of a relaxed stack: `(T, m, r)` and `(T, r, n)`, one row per relaxed slice."""
    if value.factor_rows != expected.factor_rows:
        have = "no relaxed slices" if value.factor_rows is None else "other relaxed slices"
        want = (
            "none" if expected.factor_rows is None else f"factor rows {list(expected.factor_rows)}"
        )
        raise ValueError(
            f"The packed params do not match the spec: {path} was packed with {have} "
            f"(factor rows {value.factor_rows}); this spec relaxes {want}.\n"
            f"  packed under: {format_layout(value.layout)}\n"
            f"  this spec:    {format_layout(stack_record_layout(expected))}\n{_CONVERT}"
        )
    if expected.factor_rows is None:
        return
    (relax,) = {s.relax for s in expected.relaxed.values()} or {None}
    assert relax is not None
    count = sum(r >= 0 for r in expected.factor_rows)
    m, n = shape[1:]
    for name, want in (("lora_b", (count, m, relax.rank)), ("lora_a", (count, relax.rank, n))):
        factor = getattr(value, name)
        if not eqx.is_array(factor) or leaf_type(factor)[0] != want:
            raise ValueError(
                f"The packed params do not match the spec: {path}.{name} is "
                f"{describe_leaf(factor)}, but its {count} relaxed slices of rank {relax.rank} "
                f"need {format_type(want, leaf_type(value.data)[1])}. {_REPACK} {_CONVERT}"
            )


def check_view_output(
    plan: Plan, slot: TieSlot, reader: int, value: Any, expect: TiedLeaf, mapped: int = 0
) -> None:
    """Raises if a view produced a value whose type does not fit the member it stands for.

    `mapped` leading axes of the member's recorded shape are mapped over (`jax.vmap` of packed
    params); a float dtype other than the recorded one is a cast packed tree's (members read the
    cast buffer)."""
    got = leaf_type(value)
    want = (expect.shape[mapped:], expect.dtype, expect.weak_type)
    if got[0] == want[0] and got[1] != want[1] and _is_cast(want[1], got[1]):
        return
    if got != want:
        raise ValueError(
            f"The function of view {slot.group!r} applied to {plan.paths[slot.canonical]} gives "
            f"{format_type(*got)}, which does not fit {plan.paths[reader]} "
            f"({format_type(*want)}). Fix the view function or the declaration. {_RESIZE}"
        )


def take_rows(data: Any, rows: Sequence[int]) -> Any:
    """The full stacked array `data[rows]` (an `L`-fold gather of the kept slices)."""
    return jnp.take(data, np.asarray(rows, dtype=np.int32), axis=0)


def full_leaves(
    plan: Plan,
    layout: PackedLayout,
    leaves: Sequence[Any],
    stacked: Callable[[StackedLeaf], Any] | None = None,
    relaxed: Callable[[Any, RelaxedLeaf], Any] | None = None,
) -> list[Any]:
    """The leaves of the full model, computed from packed `leaves`.

    Members of a plain tie get the canonical leaf itself (the same object, or tracer); view
    members get `fn(canonical)`; stacked leaves get `stacked(leaf)` (default: `take_rows`, plus
    each relaxed slice's delta); relaxed members get `relaxed(W, leaf)` (default:
    `W + leaf.lora_b @ leaf.lora_a`).
    """
    out = list(leaves)
    for slot in layout.relaxed:
        shared = leaves[slot.canonical].shared
        for member in (slot.canonical, *slot.readers):
            leaf = leaves[member]
            out[member] = (
                relaxed(shared, leaf)
                if relaxed is not None
                else shared + delta(leaf.lora_b, leaf.lora_a, leaf_type(shared)[1])
            )
    for slot in layout.slots:
        source = leaves[slot.canonical]
        for reader in slot.readers:
            if slot.fn is None:
                out[reader] = source
            else:
                value = slot.fn(source)
                mapped = layout.mapped.get(slot.group, 0)
                check_view_output(plan, slot, reader, value, leaves[reader], mapped)
                out[reader] = value
    for leaf in layout.stacks:
        stacked_leaf = leaves[leaf]
        if stacked is not None:
            out[leaf] = stacked(stacked_leaf)
        elif stacked_leaf.factor_rows is not None:
            out[leaf] = stacked_deltas(
                stacked_leaf.data,
                stacked_leaf.rows,
                stacked_leaf.lora_b,
                stacked_leaf.lora_a,
                stacked_leaf.factor_rows,
            )
        else:
            out[leaf] = take_rows(stacked_leaf.data, stacked_leaf.rows)
    return out

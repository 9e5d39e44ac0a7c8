"""`describe`: a readable table of a packed model's tie groups and the bytes tying saves."""

from typing import Any

import equinox as eqx
import numpy as np

from ._errors import leaf_type
from ._layout import PackedLayout, packed_layout
from ._placeholders import RelaxedLeaf, StackedLeaf, TiedLeaf, is_placeholder
from ._resolve import GroupPlan, Plan, flatten, plan_for
from ._spec import TieSpec


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return _count(shape) * np.dtype(dtype).itemsize


def _sizes(count: int, nbytes: int) -> str:
    """`840 (3.3 KiB)`: how many numbers, and their bytes."""
    return f"{count:,} ({_human(nbytes)})"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(params: Any, spec: TieSpec) -> str:
    """A table of the tie groups: members, tied leaves per member, and bytes saved; then the
    parameter counts (numbers, and their bytes) of the packed and the unpacked model.

    **Arguments:**

    - `params`: a packed pytree (from [`tietransform.pack`][]), or a full model (then it is packed
      first, without copying).
    - `spec`: the [`tietransform.TieSpec`][].

    **Returns:**

    A multi-line string. For a `tt.stack` group, `members` counts the tied slices and
    `canonical` names the slice whose value is kept (`slice 0 of blocks.mlp`). A group declared
    with `init="average"` says so: `tt.pack` stores the mean of its members. A spec
    without groups gives one line saying that nothing is tied. E.g.

    ```
    group  kind  members  leaves/member  canonical      saved
    ffn    tie   4        4              blocks[0].mlp  6.5 KiB
      ffn: blocks[0].mlp, blocks[1].mlp, blocks[2].mlp, blocks[3].mlp
    parameters: 840 (3.3 KiB) packed, 2,496 (9.8 KiB) unpacked (saved 1,656 (6.5 KiB), 66.3%)
    ```
    """
    keypaths, leaves, _ = flatten(params)
    if not spec.groups:
        arrays = [leaf_type(x)[:2] for x in leaves if eqx.is_array(x)]
        count, nbytes = sum(_count(s) for s, _ in arrays), sum(_nbytes(*a) for a in arrays)
        return f"no tie groups: nothing is tied (parameters: {_sizes(count, nbytes)})"
    if not any(is_placeholder(x) for x in leaves):
        from ._pack import pack

        params = pack(params, spec, copy=False)
    flat = flatten(params)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    layout = packed_layout(plan, leaves)
    saved = {g.name: 0 for g in plan.groups}
    saved_count = 0
    tied_leaves = {g.name: 0 for g in plan.groups}
    for slot in layout.slots:
        tied_leaves[slot.group] += 1
        for reader in slot.readers:
            r = leaves[reader]
            assert isinstance(r, TiedLeaf)
            saved[slot.group] += _nbytes(r.shape, r.dtype)
            saved_count += _count(r.shape)
    factors = {g.name: 0 for g in plan.groups}  # relaxed groups' factor parameters
    for slot in layout.relaxed:
        tied_leaves[slot.group] += 1
        saved[slot.group] += len(slot.readers) * _nbytes(
            *leaf_type(leaves[slot.canonical].shared)[:2]
        )
        saved_count += len(slot.readers) * _count(leaf_type(leaves[slot.canonical].shared)[0])
        for member in (slot.canonical, *slot.readers):
            for factor in _factors(leaves[member]):
                factors[slot.group] += _count(leaf_type(factor)[0])
                saved[slot.group] -= _nbytes(*leaf_type(factor)[:2])
                saved_count -= _count(leaf_type(factor)[0])
    packed_bytes = packed_count = 0
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, StackedLeaf):
            shape, dtype, _ = leaf_type(leaf.data)
            packed_bytes += _nbytes(shape, dtype)
            packed_count += _count(shape)
            stack = layout.stacks[index]
            for name, tied in stack.slices.items():
                saved[name] += (len(tied) - 1) * _nbytes(shape[1:], dtype)
                saved_count += (len(tied) - 1) * _count(shape[1:])
            for factor in _factors(leaf):  # stored, not saved: each group its slices' rows
                (rows, *row_shape), factor_dtype = leaf_type(factor)[:2]
                packed_bytes += _nbytes((rows, *row_shape), factor_dtype)
                packed_count += rows * _count(tuple(row_shape))
                for name in stack.relaxed:
                    count = len(stack.slices[name]) * _count(tuple(row_shape))
                    factors[name] += count
                    saved[name] -= count * np.dtype(factor_dtype).itemsize
                    saved_count -= count
        elif isinstance(leaf, RelaxedLeaf):
            for array in (leaf.shared, *_factors(leaf)):
                if array is not None:
                    packed_bytes += _nbytes(*leaf_type(array)[:2])
                    packed_count += _count(leaf_type(array)[0])
        elif eqx.is_array(leaf):
            packed_bytes += _nbytes(*leaf_type(leaf)[:2])
            packed_count += _count(leaf_type(leaf)[0])
    total_saved = sum(saved.values())
    stacked = {g.name: _stack_slices(layout, g) for g in plan.groups if g.kind == "stack"}
    rows = [("group", "kind", "members", "leaves/member", "canonical", "saved")]
    for g in plan.groups:
        if g.name in stacked:
            by_member = stacked[g.name]
            counts = sorted({len(tied) for tied, _ in by_member})
            kept = {canonical for _, canonical in by_member}
            span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            members = f"{span} slices"
            per_member = str(sum(i in layout.stacks for i in g.members[0].leaves))  # arrays
            canonical_path = (
                f"slice {kept.pop()} of {g.canonical.path}" if len(kept) == 1 else g.canonical.path
            )
        else:
            members, per_member = str(len(g.members)), str(tied_leaves[g.name])
            canonical_path = g.canonical.path
        rows.append((g.name, g.kind, members, per_member, canonical_path, _human(saved[g.name])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    for g in plan.groups:
        shown = [m.path for m in g.members]
        if len(shown) > 4:
            shown = [*shown[:2], f"... ({len(shown) - 3} more)", shown[-1]]
        if g.name in stacked:
            tied_lists = [tied for tied, _ in stacked[g.name]]
            if all(tied == tied_lists[0] for tied in tied_lists):
                lines.append(
                    f"  {g.name}: slices {_index_list(tied_lists[0])} of {', '.join(shown)}"
                )
            else:
                per = [
                    f"{_index_list(t)} of {m.path}"
                    for m, t in zip(g.members, tied_lists, strict=True)
                ]
                lines.append(f"  {g.name}: slices {', '.join(per)}")
        else:
            lines.append(f"  {g.name}: {', '.join(shown)}{_chain_note(plan, layout, g)}")
        if getattr(spec.groups.get(g.name), "init", None) == "average":
            lines[-1] += " (init='average': tt.pack stores the members' mean)"
        if g.relax is not None:
            lines.append(
                f"    relaxed ({g.relax.describe()}): each member reads W + B @ A on its "
                f"matrices; {factors[g.name]:,} factor parameters"
            )
    unpacked = packed_bytes + total_saved
    fraction = total_saved / unpacked if unpacked else 0.0
    lines.append(
        f"parameters: {_sizes(packed_count, packed_bytes)} packed, "
        f"{_sizes(packed_count + saved_count, unpacked)} unpacked "
        f"(saved {_sizes(saved_count, total_saved)}, {100 * fraction:.1f}%)"
    )
    return "\n".join(lines)


def _factors(leaf: Any) -> list[Any]:
    """The low-rank factors a relaxed placeholder stores (none for strict ones)."""
    return [
        f for f in (getattr(leaf, "lora_b", None), getattr(leaf, "lora_a", None)) if f is not None
    ]


def _chain_note(plan: Plan, layout: PackedLayout, group: GroupPlan) -> str:
    """For a view whose source is a member of other groups: whose buffer it reads, and where."""
    if not group.through:
        return ""
    buffers = dict.fromkeys(plan.paths[s.canonical] for s in layout.slots if s.group == group.name)
    owners = " and ".join(repr(name) for name in group.through)
    return f" (reads the buffer of {owners}: {', '.join(buffers)})"


def _stack_slices(layout: PackedLayout, group: GroupPlan) -> list[tuple[tuple[int, ...], int]]:
    """Per member of a stack group: the slice indices it ties and the one whose value is kept."""
    out = []
    for member in group.members:
        stack = next(layout.stacks[i] for i in member.leaves if i in layout.stacks)
        tied = stack.slices[group.name]
        out.append((tied, stack.kept[stack.rows[tied[0]]]))
    return out


def _index_list(indices: tuple[int, ...]) -> str:
    """`0-3` for a run of consecutive indices, else `[0, 2, 5]`."""
    if len(indices) > 2 and indices == tuple(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return str(list(indices))

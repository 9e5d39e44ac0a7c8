"""Resolving a `TieSpec` against a pytree structure into a `Plan`: which leaf reads which buffer.

Resolution depends only on the tree's structure (its treedef), never on array values, so a plan
is computed once per structure and kept on the spec. A packed pytree and its full model flatten to
the same treedef (placeholders count as leaves), so they share one plan.

The pipeline, one step per function:

1. `Index` (in `_select`): the model's key paths, and for every node the flat indices of the
   leaves under it.
2. `_select`: a selector (path pattern or `where` function) to the `Member` nodes it picks
   (`_select.select`), or an error whose hints come from `_hints`.
3. One rule per declaration type, looked up once in `_RULES` (JAX's checkify style):

   | declaration | rule          | writes (claims)            | reads                        |
   |-------------|---------------|----------------------------|------------------------------|
   | `Group`     | `_group_rule` | every member               | its canonical member         |
   | `View`      | `_view_rule`  | its targets                | its source                   |
   | `Stack`     | `_stack_rule` | the stacked leaves         | their kept slices            |

4. `_check_overlap`: a leaf is written by one group only (stacks may share a leaf, not a slice).
5. `_chain`: a view whose source is written by another tie group or view reads that group's
   buffer: the slot's canonical becomes the buffer's leaf, and its function is composed with the
   other view's. Any number of views may read one source; the gradient of a buffer is then the
   sum over its plain members and every view's pullback, as JAX adds the cotangents of a value
   read in several places.

`plan_for` takes what `flatten` returns (`Flat`) and also checks what needs the leaves' shapes
(on every call, since one treedef can hold arrays of many shapes): each stacked member's arrays
share a leading axis, and a view's member does not already have its source's shape. Hints look
at the model (see `_hints`).
"""

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax

from . import _compat
from ._errors import describe_leaf, format_type, leaf_type
from ._hints import ORIENTATION, no_match, one_member_hint, plain_group_hint
from ._paths import KeyPath, format_path, matches, parse_pattern
from ._placeholders import is_placeholder
from ._record import fn_name
from ._select import (
    Index,
    Member,
    empty_nodes,
    full_shape,
    full_type,
    needs_lengths,
    select,
    sequence_lengths,
)
from ._spec import Declaration, Group, Relaxed, Selector, Stack, TieSpec, View


@dataclasses.dataclass(frozen=True)
class TieSlot:
    """One buffer: leaf `canonical` keeps its value; each leaf in `readers` reads it (via `fn`)."""

    group: str
    canonical: int
    readers: tuple[int, ...]
    fn: Callable[[Any], Any] | None
    member_is_leaf: bool
    relax: Relaxed | None = None  # a relaxed tie: each member reads `W + B_l @ A_l` (matrices)


@dataclasses.dataclass(frozen=True)
class StackSlot:
    """Slices `slices` (as declared, may be negative; `None` for all) of the stacked leaf `leaf`
    share one buffer."""

    group: str
    leaf: int
    slices: tuple[int, ...] | None
    canonical: int | None
    length: int | None = None  # the stacked axis length the declaration requires, if any
    relax: Relaxed | None = None  # a relaxed tie: each tied slice reads `W + B_i @ A_i`


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """A resolved group, for messages and `describe`."""

    name: str
    kind: str
    members: tuple[Member, ...]
    canonical: Member
    through: tuple[str, ...] = ()  # a view's source's groups, whose buffer the view reads
    relax: Relaxed | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything `pack`, `unpack` and `tie` need to know about a structure under a spec."""

    treedef: Any
    paths: tuple[str, ...]
    groups: tuple[GroupPlan, ...]
    slots: tuple[TieSlot, ...]
    stacks: tuple[StackSlot, ...]


class Resolved(NamedTuple):
    """What one rule makes of one declaration."""

    group: GroupPlan
    slots: tuple[TieSlot, ...]
    stacks: tuple[StackSlot, ...]
    writes: tuple[int, ...]  # the leaves it claims: no other group may write them
    reads: tuple[int, ...] = ()  # a view's source leaves: written by its own group or another


class Flat(NamedTuple):
    """A pytree flattened with paths, placeholders counted as leaves (what `flatten` returns)."""

    keypaths: list[KeyPath]
    leaves: list[Any]
    treedef: Any


def flatten(tree: Any) -> Flat:
    """Flattens with paths, treating placeholders as leaves: `Flat(keypaths, leaves, treedef)`."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_placeholder)
    keypaths = [tuple(path) for path, _ in with_paths]
    return Flat(keypaths, [leaf for _, leaf in with_paths], treedef)


def plan_for(spec: TieSpec, flat: Flat) -> Plan:
    """The plan of `spec` on the structure of `flat` (cached on the spec, by treedef).

    Its leaves (full or packed) are checked on every call: stacked members must be layer stacks,
    and a view's member must not already have its source's shape. Errors give hints that depend
    on the arrays' shapes.
    """
    if not isinstance(spec, TieSpec):
        raise TypeError(f"Expected a tietransform.TieSpec, got {type(spec).__name__}.")
    keypaths, leaves, treedef = flat
    plan = spec._plans.get(treedef)
    if plan is None:
        plan = _resolve_spec(spec, Index.of(keypaths, treedef, leaves))
        spec._plans[treedef] = plan
    _check_layer_stacks(spec, plan, flat)
    # The orientation checks depend on the structure and the members' shapes only: once each.
    signature = (treedef, tuple(full_shape(x) for x in leaves))
    checked = spec.__dict__.setdefault("_orientations_checked", set())
    if signature not in checked:
        _check_view_orientation(plan, flat)
        checked.add(signature)
    return plan


def _resolve_spec(spec: TieSpec, index: Index) -> Plan:
    """Applies each declaration's rule, then checks that no two groups write one leaf."""
    resolved = [_rule(decl)(index, name, decl) for name, decl in spec.groups.items()]
    _check_overlap(index, resolved)
    resolved = _chain(index, resolved)
    paths = tuple(format_path(k) for k in index.keypaths)
    return Plan(
        index.treedef,
        paths,
        tuple(r.group for r in resolved),
        tuple(slot for r in resolved for slot in r.slots),
        tuple(stack for r in resolved for stack in r.stacks),
    )


# -- the rules, one per declaration type ------------------------------------------------------
_Rule = Callable[[Index, str, Any], Resolved]
_RULES: dict[type, _Rule] = {}


def _rule(decl: Declaration) -> _Rule:
    rule = _RULES.get(type(decl))
    if rule is None:
        raise TypeError(f"No resolution rule for the declaration {type(decl).__name__}.")
    return rule


def _group_rule(index: Index, name: str, decl: Group) -> Resolved:
    """A plain group: every member reads its canonical member."""
    members = _select_all(index, name, decl.members)
    if len(members) < 2:
        raise ValueError(
            f"Tie group {name!r} selects only one member ({members[0].path}); a tie needs "
            f"at least two. {one_member_hint(index, name, members[0])}"
        )
    if decl.layers is not None:
        _check_layer_count(index, name, *decl.layers)
    canonical = _pick_canonical(index, name, members, decl.canonical)
    readers = [m for m in members if m is not canonical]
    _check_disjoint(name, members)
    _check_same_structure(index, name, [canonical, *readers])
    slots = _tie_slots(name, canonical, readers, None, decl.relax)
    writes = tuple(leaf for m in members for leaf in m.leaves)
    group = GroupPlan(name, "tie", tuple(members), canonical, relax=decl.relax)
    return Resolved(group, slots, (), writes)


_RULES[Group] = _group_rule


def _check_layer_count(index: Index, name: str, pattern: str, layers: int) -> None:
    """Raises unless `pattern` (e.g. `blocks[*]`) matches exactly `layers` nodes."""
    parsed = parse_pattern(pattern)
    lengths = sequence_lengths(index) if needs_lengths(parsed) else None
    found = {k for k in [*index.nodes, *empty_nodes(index)] if matches(parsed, k, lengths)}
    if len(found) != layers:
        raise ValueError(
            f"Tie group {name!r} shares {layers} layers, but {pattern!r} matches {len(found)} "
            f"nodes in the model. Pass `layers={len(found)}` to `tt.share_layers` (or select "
            "the layers it should share)."
        )


def _view_rule(index: Index, name: str, decl: View) -> Resolved:
    """A view: each target reads `fn(source)`, leaf by leaf."""
    sources = _select(index, name, decl.source)
    if len(sources) != 1:
        raise ValueError(
            f"The source of view {name!r} must select exactly one node, got:\n"
            + _listing(m.path for m in sources)
        )
    (source,) = sources
    targets = _select_all(index, name, decl.targets)
    if any(t.path == source.path for t in targets):
        raise ValueError(f"View {name!r} maps {source.path} onto itself.")
    members = sorted([source, *targets], key=lambda m: m.leaves[0])
    _check_disjoint(name, members)
    _check_same_structure(index, name, [source, *targets])
    slots = _tie_slots(name, source, targets, decl.fn)
    writes = tuple(leaf for m in targets for leaf in m.leaves)
    group = GroupPlan(name, "view", tuple(members), source)
    return Resolved(group, slots, (), writes, reads=source.leaves)


_RULES[View] = _view_rule


def _stack_rule(index: Index, name: str, decl: Stack) -> Resolved:
    """A stack: each selected leaf ties its own slices."""
    members = _select(index, name, decl.selector)
    _check_disjoint(name, members)
    stacks = tuple(
        StackSlot(name, leaf, decl.slices, decl.canonical, decl.layers, decl.relax)
        for member in members
        for leaf in member.leaves
    )
    writes = tuple(s.leaf for s in stacks)
    group = GroupPlan(name, "stack", tuple(members), members[0], relax=decl.relax)
    return Resolved(group, (), stacks, writes)


_RULES[Stack] = _stack_rule


def _select(index: Index, name: str, selector: Selector) -> list[Member]:
    """The nodes `selector` picks, in leaf order; raises if a pattern matches nothing."""
    members = select(index, name, selector)
    if not members:  # only a pattern selects nothing: a `where` function raises first
        assert isinstance(selector, str)
        raise ValueError(no_match(index, name, selector))
    return members


def _select_all(index: Index, name: str, selectors: Sequence[Selector]) -> list[Member]:
    """The union of what `selectors` pick, each node once, in leaf order."""
    found = {m.path: m for sel in selectors for m in _select(index, name, sel)}
    return sorted(found.values(), key=lambda m: m.leaves[0])


def _tie_slots(
    name: str,
    canonical: Member,
    readers: Sequence[Member],
    fn: Callable[[Any], Any] | None,
    relax: Relaxed | None = None,
) -> tuple[TieSlot, ...]:
    """One slot per leaf position of the (same-structured) members."""
    return tuple(
        TieSlot(
            name,
            canonical.leaves[position],
            tuple(m.leaves[position] for m in readers),
            fn,
            member_is_leaf=not relative,
            relax=relax,
        )
        for position, relative in enumerate(canonical.relative)
    )


def _check_overlap(index: Index, resolved: Sequence[Resolved]) -> None:
    """A leaf belongs to one group only; stack groups may share a leaf (their slices are checked
    against each other when the axis length is known)."""
    claims: dict[int, Resolved] = {}
    for r in resolved:
        for leaf in r.writes:
            other = claims.get(leaf)
            if other is not None and not (other.group.kind == "stack" == r.group.kind):
                raise ValueError(
                    f"Tie groups {other.group.name!r} and {r.group.name!r} overlap at "
                    f"{format_path(index.keypaths[leaf])}. A leaf can belong to one group "
                    "only; narrow one of the declarations."
                )
            claims[leaf] = r
    for r in resolved:
        for leaf in r.reads:
            other = claims.get(leaf)
            if other is not None and other.group.relax is not None:
                raise ValueError(
                    f"View {r.group.name!r} reads {format_path(index.keypaths[leaf])}, a member "
                    f"of the relaxed tie group {other.group.name!r}: each member of a relaxed "
                    "group reads its own `W + B @ A`, so there is no one buffer for a view to "
                    "read. Tie the view's source strictly, or read a leaf outside the group."
                )
            if other is not None and other.group.kind == "stack":
                raise ValueError(
                    f"Tie groups {other.group.name!r} and {r.group.name!r} overlap at "
                    f"{format_path(index.keypaths[leaf])}: view {r.group.name!r} reads a "
                    "stacked array whose slices tt.stack ties, and a view's source must be a "
                    "whole buffer. Read one of the group's plain members, or narrow one of the "
                    "declarations."
                )


def _chain(index: Index, resolved: Sequence[Resolved]) -> list[Resolved]:
    """Points each view slot whose source is another group's reader at the buffer it reads."""
    reads_from: dict[int, tuple[TieSlot, int]] = {}  # reader leaf -> its slot, and the source
    for r in resolved:
        for slot in r.slots:
            for reader in slot.readers:
                reads_from[reader] = (slot, slot.canonical)
    out = []
    for r in resolved:
        if r.group.kind != "view" or not any(leaf in reads_from for leaf in r.reads):
            out.append(r)
            continue
        slots, through = [], []
        for slot in r.slots:
            canonical, fn, seen = slot.canonical, slot.fn, [r.group.name]
            while canonical in reads_from:
                other, canonical = reads_from[canonical]
                if other.group in seen:
                    raise ValueError(
                        f"Views {' -> '.join([*seen, other.group])} read each other in a cycle "
                        f"(at {format_path(index.keypaths[slot.canonical])}), so no buffer "
                        "holds their value. Make one of them read a leaf that no view writes."
                    )
                seen.append(other.group)
                fn = _compose(fn, other.fn)
            through += [g for g in seen[1:] if g not in through]
            slots.append(dataclasses.replace(slot, canonical=canonical, fn=fn))
        group = dataclasses.replace(r.group, through=tuple(through))
        out.append(r._replace(group=group, slots=tuple(slots)))
    return out


def _compose(
    outer: Callable[[Any], Any] | None, inner: Callable[[Any], Any] | None
) -> Callable[[Any], Any] | None:
    """`outer ∘ inner`, where `None` is the identity; named for layout records and messages."""
    if inner is None:
        return outer
    if outer is None:
        return inner

    def composed(x: Any) -> Any:
        return outer(inner(x))

    composed.__qualname__ = f"{fn_name(outer)}∘{fn_name(inner)}"  # read by layout records
    return composed


# -- checks within one group ------------------------------------------------------------------
def _listing(paths: Any) -> str:
    """Paths one per line, indented, for error messages."""
    return "\n".join(f"  {p}" for p in paths)


def _check_disjoint(name: str, members: Sequence[Member]) -> None:
    for a, b in zip(members, members[1:], strict=False):
        if set(a.leaves) & set(b.leaves):
            raise ValueError(
                f"Members of tie group {name!r} overlap: {a.path} and {b.path}. A member "
                "cannot contain another; make the pattern select one level only."
            )


def _check_same_structure(index: Index, name: str, members: Sequence[Member]) -> None:
    first = members[0]
    for other in members[1:]:
        if other.relative == first.relative:
            continue
        below = [{_relative_path(index, m, i) for i in m.leaves} for m in (first, other)]
        only_first, only_other = sorted(below[0] - below[1]), sorted(below[1] - below[0])
        alone = ((first, only_first), (other, only_other))
        detail = "; ".join(f"{m.path} alone has {', '.join(o)}" for m, o in alone if o) or (
            "leaves in a different order"
        )
        raise ValueError(
            f"Members of tie group {name!r} must have the same structure. "
            f"{first.path} and {other.path} differ: {detail}."
        )


def _relative_path(index: Index, member: Member, leaf: int) -> str:
    """The path of `leaf` below `member`, as a pattern relative to it (`layers[0].weight`)."""
    return format_path(index.keypaths[leaf][len(member.keys) :])


def _pick_canonical(
    index: Index, name: str, members: Sequence[Member], canonical: str | int | None
) -> Member:
    if canonical is None:
        return members[0]
    if isinstance(canonical, int):
        if not -len(members) <= canonical < len(members):
            raise ValueError(
                f"canonical={canonical} is out of range for tie group {name!r}, which has "
                f"{len(members)} members."
            )
        return members[canonical]
    wanted = parse_pattern(canonical)
    lengths = sequence_lengths(index) if needs_lengths(wanted) else None
    found = [m for m in members if matches(wanted, m.keys, lengths)]
    if len(found) > 1:
        raise ValueError(
            f"canonical={canonical!r} matches {len(found)} members of tie group {name!r}; name "
            f"exactly one member. It matches:\n{_listing(m.path for m in found)}"
        )
    if found:
        return found[0]
    raise ValueError(
        f"canonical={canonical!r} is not a member of tie group {name!r}; its members are:\n"
        + _listing(m.path for m in members)
    )


# -- checks that need the leaves ---------------------------------------------------------------
def _check_layer_stacks(spec: TieSpec, plan: Plan, flat: Flat) -> None:
    """Every array of one stacked member must share its leading axis: the layer axis.

    Non-array leaves inside a stacked subtree (an MLP's activation, a Dropout's `p`) are left
    alone, as in plain groups; a member that is itself a non-array leaf, or that holds no array,
    is refused.
    """
    leaves = flat.leaves
    for group in plan.groups:
        if group.kind != "stack":
            continue
        for member in group.members:
            shapes = {i: full_shape(leaves[i]) for i in member.leaves}
            if all(s is None and not is_placeholder(leaves[i]) for i, s in shapes.items()):
                _refuse_unstacked(group.name, member, leaves)  # (a restored dict: refused later)
            empty = [i for i, s in shapes.items() if s and s[0] == 0]
            if empty:
                raise ValueError(
                    f"tt.stack group {group.name!r} selects {plan.paths[empty[0]]} "
                    f"({full_type(leaves[empty[0]])}), whose leading axis has length 0: it "
                    "stacks no layer, so there is no slice to keep. Stack at least one layer, "
                    "or leave this array out of the declaration."
                )
            lengths = {s[0] if s else None for s in shapes.values() if s is not None}
            if len(lengths) <= 1:
                continue
            listing = "\n".join(
                f"  {plan.paths[i]}  {full_type(leaves[i])}"
                for i in member.leaves
                if shapes[i] is not None
            )
            decl = spec.groups[group.name]
            index = Index.of(flat.keypaths, flat.treedef, flat.leaves)
            hint = plain_group_hint(
                index, group.name, getattr(decl, "selector", None), group.members
            )
            raise ValueError(
                f"tt.stack group {group.name!r} selects {member.path}, whose arrays do not share "
                "a leading axis, so it has no layer axis to tie along:\n"
                f"{listing}\n"
                "A stacked member holds `(L, ...)` arrays for `L` layers (a scan-over-layers "
                f"model). {hint}"
            )


def _refuse_unstacked(name: str, member: Member, leaves: Sequence[Any]) -> None:
    if member.relative == ((),):
        found = describe_leaf(leaves[member.leaves[0]])
        raise ValueError(
            f"tt.stack group {name!r} selects {member.path} ({found}), "
            "which is not a stacked array; stacked ties need an array with a leading axis. Select "
            "the stacked arrays, or the subtree that holds them."
        )
    raise ValueError(
        f"tt.stack group {name!r} selects {member.path}, which holds no array (its leaves are "
        f"{', '.join(sorted({type(leaves[i]).__name__ for i in member.leaves}))}); stacked ties "
        "need arrays with a leading axis. Select the subtree that holds the stacked arrays."
    )


def _check_view_orientation(plan: Plan, flat: Flat) -> None:
    """A view member that already has its source's shape: a transform that changes the shape is
    refused, naming the plain group. Square matrices tie in either orientation, so two likely
    mistakes are warned about: a transpose from an Equinox `Embedding` onto a `Linear` (both
    (vocab, dim)), and a plain group of a Flax `embedding` (vocab, dim) and `kernel` (in, out)."""
    keypaths, leaves, treedef = flat
    for slot in plan.slots:
        shape = full_shape(leaves[slot.canonical])
        if shape is None:
            continue
        if slot.fn is None:
            if len(shape) == 2 and shape[0] == shape[1]:
                _warn_flax_plain_group(slot, plan, keypaths)
            continue
        same = [r for r in slot.readers if full_shape(leaves[r]) == shape]
        if not same:
            continue
        dtype = leaf_type(leaves[slot.canonical])[1]
        try:
            out = jax.eval_shape(slot.fn, jax.ShapeDtypeStruct(shape, dtype))
        except Exception:
            continue  # the layout check reports a view that fails, with its error
        source, targets = plan.paths[slot.canonical], [plan.paths[r] for r in same]
        if isinstance(out, jax.ShapeDtypeStruct) and out.shape != shape:
            raise ValueError(
                f"View {slot.group!r} changes the shape of {source} ({format_type(shape, dtype)}) "
                f"to {format_type(out.shape, out.dtype)} with {fn_name(slot.fn)}, but "
                f"{', '.join(targets)} already {'has' if len(same) == 1 else 'have'} the source's "
                "shape, so no transform is needed. Tie them with a plain group: "
                f"TieSpec({slot.group}={[source, *targets]!r}). {ORIENTATION}"
            )
        if len(shape) == 2 and _transposes(slot.fn, shape[0], dtype):
            _warn_equinox_transpose(slot, plan, treedef, leaves, same)


def _warn_flax_plain_group(slot: TieSlot, plan: Plan, keypaths: Sequence[KeyPath]) -> None:
    """A square Flax `embedding` tied to a `kernel` by a plain group (Linen or NNX names)."""
    source = _flax_name(keypaths[slot.canonical])
    for reader in slot.readers:
        if {source, _flax_name(keypaths[reader])} != {"embedding", "kernel"}:
            continue
        embedding, kernel = (
            (slot.canonical, reader) if source == "embedding" else (reader, slot.canonical)
        )
        warnings.warn(
            f"Tie group {slot.group!r} ties {plan.paths[kernel]} (a Flax kernel, (in, out)) to "
            f"{plan.paths[embedding]} (an embedding, (vocab, dim)) untransposed, and both are "
            "square, so nothing checks the orientation. A tied output head `Dense(vocab)` reads "
            f"the transposed embedding: tt.view({plan.paths[embedding]!r}, "
            f"{plan.paths[kernel]!r}, jnp.transpose). Keep the plain group only for a kernel "
            f"that maps vocab -> dim. {ORIENTATION}",
            UserWarning,
            stacklevel=3,
        )
        return


def _flax_name(keys: KeyPath) -> str | None:
    """The name of a Flax parameter: its last dict key (NNX state adds a `.value`)."""
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    if not keys or not isinstance(keys[-1], jax.tree_util.DictKey):
        return None
    name = keys[-1].key
    return name if isinstance(name, str) else None


def _transposes(fn: Callable[[Any], Any], n: int, dtype: Any) -> bool:
    """Whether `fn` is one transpose of an `(n, n)` matrix (`jnp.transpose`, `.T`, `.mT`,
    `jnp.swapaxes(w, -1, -2)`), read off its jaxpr: tracing costs no arithmetic at any `n`."""
    try:
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((n, n), dtype))
    except Exception:
        return False
    jaxpr, _ = _compat.split_jaxpr(closed)
    while len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive in _compat.CALL_PRIMITIVES:
        jaxpr, _ = _compat.call_jaxpr(jaxpr.eqns[0])
    if len(jaxpr.eqns) != 1:
        return False
    eqn = jaxpr.eqns[0]
    return eqn.primitive is jax.lax.transpose_p and tuple(eqn.params["permutation"]) == (1, 0)


def _warn_equinox_transpose(
    slot: TieSlot, plan: Plan, treedef: Any, leaves: Sequence[Any], readers: Sequence[int]
) -> None:
    tree = jax.tree_util.tree_unflatten(treedef, list(leaves))
    kinds = (eqx.nn.Embedding, eqx.nn.Linear)
    with_paths, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, kinds) or is_placeholder(x)
    )
    owner = {
        format_path((*path, jax.tree_util.GetAttrKey("weight"))): type(node)
        for path, node in with_paths
        if isinstance(node, kinds)
    }
    source = plan.paths[slot.canonical]
    heads = [plan.paths[r] for r in readers if owner.get(plan.paths[r]) is eqx.nn.Linear]
    if owner.get(source) is not eqx.nn.Embedding or not heads:
        return
    warnings.warn(
        f"View {slot.group!r} transposes {source}, an eqx.nn.Embedding's weight, for "
        f"{', '.join(heads)} (eqx.nn.Linear), and both are square, so nothing checks the "
        f"orientation. A tied LM head `Linear(dim, vocab)` reads the embedding untransposed: "
        f"TieSpec({slot.group}={[source, *heads]!r}). Keep the view only for a "
        f"`Linear(vocab, dim)`. {ORIENTATION}",
        UserWarning,
        stacklevel=2,
    )

"""Hints in declaration errors. Each looks at the model: a declaration it suggests selects nodes
of this model (checked by `tests/test_hints.py`), a group of one member whose arrays share a
leading axis is pointed to `tt.stack`, and a view's orientation rule is given per library.
"""

import re
from collections.abc import Sequence

import jax

from ._paths import (
    Glob,
    Key,
    KeyPath,
    PatternSegment,
    Slice,
    format_path,
    format_segment,
    matches,
    nearest,
    parse_pattern,
    where_source,
    writable,
)
from ._select import (
    Index,
    Member,
    as_member,
    empty_nodes,
    full_shape,
    full_type,
    needs_lengths,
    sequence_lengths,
)
from ._spec import Selector


ORIENTATION = (
    "Orientation by library: Equinox stores `Linear(in, out).weight` as (out, in) and "
    "`Embedding.weight` as (vocab, dim), so a tied head `Linear(dim, vocab)` has the "
    "embedding's own shape and orientation: a plain group. Flax stores a `Dense`/`nnx.Linear` "
    "kernel as (in, out) and `Embed.embedding` as (vocab, dim), so a tied head's kernel is the "
    "transpose: `tt.view(embedding, kernel, jnp.transpose)`."
)


def no_match(index: Index, name: str, pattern: str) -> str:
    """What a pattern that matches no node of the model is told: the empty nodes it matches, or
    the stacked node it may have meant, the nearest paths, and `where` functions for keys no
    pattern spells."""
    parsed = parse_pattern(pattern)
    lengths = sequence_lengths(index) if needs_lengths(parsed) else None
    empty = [k for k in empty_nodes(index) if matches(parsed, k, lengths)]
    if empty:
        return (
            f"Pattern {pattern!r} of tie group {name!r} matches only "
            f"{', '.join(format_path(k) for k in empty[:3])}, which holds no leaves "
            "(None, an empty container or a module without fields). Tie groups tie arrays: select "
            "nodes that hold them."
        )
    candidates = [format_path(k) for k in index.nodes]
    if "*" in pattern:  # suggest patterns for patterns: blocks[3].mlp -> blocks[*].mlp
        candidates = [re.sub(r"\[\d+\]", "[*]", c) for c in candidates]
    hint = nearest(pattern.lstrip("."), candidates)
    example = format_path(index.keypaths[0]) if index.keypaths else "blocks[0].mlp.weight"
    return (
        f"Pattern {pattern!r} of tie group {name!r} matches nothing in the model."
        + _slice_of_array_hint(index, parsed)
        + _out_of_range_hint(index, parsed)
        + _stacked_hint(index, parsed)
        + (f" Nearest paths: {', '.join(hint)}." if hint else "")
        + f" Paths look like {example!r}; `*` matches one segment, `**` many."
        + _unwritable_hint(index)
    )


def _slice_of_array_hint(index: Index, parsed: Sequence[PatternSegment]) -> str:
    """For `w[1:]` or `w[0]` where `w` is an array: patterns select nodes, not array slices."""
    end = len(parsed)
    while end and (isinstance(parsed[end - 1], Slice) or _is_index(parsed[end - 1])):
        end -= 1
    if end in (0, len(parsed)):
        return ""
    found = [
        k
        for i, k in enumerate(index.keypaths)
        if matches(parsed[:end], k) and (index.leaves is None or full_shape(index.leaves[i]))
    ]
    if not found:
        return ""
    path = format_path(found[0])
    return (
        f" {path} is an array, and a pattern selects nodes of the pytree, not slices of an "
        f"array: to tie slices of a stacked array, use tt.stack({path!r}, slices=[...])."
    )


def _out_of_range_hint(index: Index, parsed: Sequence[PatternSegment]) -> str:
    """For `l[5]` or `l[-3]` where every list `l[...]` selects is shorter: its length."""
    lengths = sequence_lengths(index)
    for position, segment in enumerate(parsed):
        if not _is_index(segment) or not position:
            continue
        assert isinstance(segment, Key)
        sized = [(k, lengths(k)) for k in index.nodes if matches(parsed[:position], k, lengths)]
        sized = [(k, n) for k, n in sized if n is not None]
        if sized and all(not -n <= segment.value < n for _, n in sized):
            k, n = sized[0]
            return (
                f" {format_path(k)} has {n} element{'s' if n != 1 else ''}, so "
                f"[{segment.value}] is out of range."
            )
    return ""


def _is_index(segment: PatternSegment) -> bool:
    return isinstance(segment, Key) and type(segment.value) is int


def _unwritable_hint(index: Index) -> str:
    """For models with keys that no pattern spells (enum members, objects): `where` functions."""
    odd = [k for k in index.nodes if k and not writable(k[-1])]
    if not odd:
        return ""
    shown = "; ".join(f"{format_path(k)}: `{where_source(k)}`" for k in odd[:3])
    return (
        f" Some keys of this model cannot be written as a pattern; select them with a `where` "
        f"function instead: {shown}{' ...' if len(odd) > 3 else ''}."
    )


def _layer_length(index: Index, member: Member) -> int | None:
    """`L` if every array of `member` has the leading axis length `L >= 2` (known leaves)."""
    if index.leaves is None:
        return None
    shapes = [full_shape(index.leaves[i]) for i in member.leaves]
    lengths = {s[0] for s in shapes if s}
    if len(lengths) != 1 or any(not s for s in shapes):
        return None
    (length,) = lengths
    return length if length >= 2 else None


def _alike(index: Index, a: Member, b: Member) -> bool:
    """Same structure, and (when the leaves are known) the same shapes and dtypes."""
    if a.relative != b.relative:
        return False
    if index.leaves is None:
        return True
    leaves = index.leaves
    types = [
        [full_type(leaves[i]) if full_shape(leaves[i]) is not None else None for i in m.leaves]
        for m in (a, b)
    ]
    return types[0] == types[1]


def _sibling_pattern(index: Index, member: Member) -> tuple[str, int] | None:
    """A pattern that selects `member` and at least one more node of the same structure,
    disjoint from it: one segment of its path made a wildcard (list indices first)."""
    keys = member.keys
    indices = [i for i, k in enumerate(keys) if isinstance(k, jax.tree_util.SequenceKey)]
    others = [i for i in range(len(keys)) if i not in indices]
    for position in [*indices, *others]:  # the outermost repetition first: blocks[*]
        pattern = _wildcard_path(keys, position)
        parsed = parse_pattern(pattern)
        found = [as_member(index, "", k) for k in index.nodes if matches(parsed, k)]
        leaves = [i for m in found for i in m.leaves]
        if (
            len(found) >= 2
            and all(_alike(index, m, member) for m in found)
            and len(set(leaves)) == len(leaves)
        ):
            return pattern, len(found)
    return None


def _twin(index: Index, member: Member) -> Member | None:
    """Another node disjoint from `member` with the same structure, if the model has one."""
    for keys, leaves in index.nodes.items():
        if keys == member.keys or set(leaves) & set(member.leaves):
            continue
        other = as_member(index, "", keys)
        if _alike(index, other, member):
            return other
    return None


def one_member_hint(index: Index, name: str, member: Member) -> str:
    hints = []
    sibling = _sibling_pattern(index, member)
    if sibling is not None:
        hints.append(
            f"TieSpec({name}={sibling[0]!r}) selects it and {sibling[1] - 1} more node(s) like it."
        )
    stack = f"TieSpec({name}=tt.stack({member.path!r}))"
    length = _layer_length(index, member)
    if length is not None and (sibling is None or len(member.leaves) >= 2):
        hints.append(
            f"Its arrays share a leading axis of length {length}: if they are stacked layers "
            f"`(L, ...)`, tie them with {stack}."
        )
    elif index.leaves is None and sibling is None:
        hints.append(f"If its arrays are stacked layers `(L, ...)`, tie them with {stack}.")
    if not hints:
        other = _twin(index, member)
        hints.append(
            f"Name the members, e.g. TieSpec({name}=[{member.path!r}, {other.path!r}])."
            if other is not None
            else "No other node of this model has its structure, shapes and dtypes."
        )
    return " ".join(hints)


def plain_group_hint(
    index: Index, name: str, selector: Selector | None, members: Sequence[Member]
) -> str:
    """For a stack that selected unstacked blocks: the plain group that ties the blocks."""
    same = all(m.relative == members[0].relative for m in members)
    if len(members) >= 2 and same and isinstance(selector, str):
        return f"To tie a list of blocks, use a plain group: TieSpec({name}={selector!r})."
    if len(members) >= 2 and same:
        return (
            "To tie a list of blocks, use a plain group with the same selector: "
            f"TieSpec({name}=<selector>)."
        )
    sibling = _sibling_pattern(index, members[0])
    if sibling is not None:
        return f"To tie a list of blocks, use a plain group: TieSpec({name}={sibling[0]!r})."
    return "To tie a list of blocks, use a plain group that selects each block."


def _stacked_hint(index: Index, parsed: Sequence[PatternSegment]) -> str:
    """For a wildcard pattern that matches nothing: the stacked node it may have meant."""
    plain = [s for s in parsed if s not in (Glob("*"), Glob("**"))]
    if len(plain) == len(parsed) or not plain:
        return ""
    for keys in index.nodes:
        if not matches(plain, keys):
            continue
        path = format_path(keys)
        if index.leaves is None:
            return f" If {path} holds stacked layers `(L, ...)`, tie them with tt.stack({path!r})."
        if _layer_length(index, as_member(index, "", keys)):
            return f" {path} holds stacked layers `(L, ...)`: tie them with tt.stack({path!r})."
    return ""


def _wildcard_path(keys: KeyPath, position: int) -> str:
    """The path `keys` as a pattern, with the segment at `position` replaced by `*`."""
    parts = [format_segment(key, i == 0) for i, key in enumerate(keys)]
    sequence = isinstance(keys[position], jax.tree_util.SequenceKey)
    parts[position] = "[*]" if sequence else "*" if position == 0 else ".*"
    return "".join(parts)

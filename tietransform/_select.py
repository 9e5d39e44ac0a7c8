"""Selecting the nodes a declaration names: a path pattern or a `where` function, over an `Index`.

`select` turns one selector into the `Member` nodes it picks, in leaf order. A pattern is matched
against every node's key path (`_paths.matches`); a `where` function is called on the model's
structure with a marker in every leaf, and the nodes it returns are located by identity. What a
pattern that matches nothing is told is a hint, built by `_hints.no_match`.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import equinox as eqx
import jax

from ._errors import format_type, leaf_type
from ._paths import (
    Key,
    KeyPath,
    PatternSegment,
    Segment,
    Slice,
    format_path,
    matches,
    parse_pattern,
    segments,
)
from ._placeholders import StackedLeaf, TiedLeaf
from ._spec import Selector


@dataclasses.dataclass(frozen=True)
class Member:
    """One selected node: its path and the flat indices of the leaves under it, in order."""

    path: str
    keys: KeyPath
    leaves: tuple[int, ...]
    relative: tuple[tuple[Segment, ...], ...]


@dataclasses.dataclass(frozen=True)
class Index:
    """The model as resolution sees it: structure, key paths, nodes, and (maybe) leaves."""

    treedef: Any
    keypaths: tuple[KeyPath, ...]
    nodes: dict[KeyPath, tuple[int, ...]]  # every node's path -> the leaves under it, in order
    leaves: Sequence[Any] | None

    @classmethod
    def of(cls, keypaths: Sequence[KeyPath], treedef: Any, leaves: Sequence[Any] | None) -> "Index":
        keypaths = tuple(tuple(k) for k in keypaths)
        nodes: dict[KeyPath, list[int]] = {}
        for index, keys in enumerate(keypaths):
            for depth in range(1, len(keys) + 1):
                nodes.setdefault(keys[:depth], []).append(index)
        return cls(treedef, keypaths, {k: tuple(v) for k, v in nodes.items()}, leaves)


def select(index: Index, name: str, selector: Selector) -> list[Member]:
    """The nodes `selector` picks, in leaf order: none when a pattern matches nothing (the caller
    raises, with `_hints.no_match`'s message)."""
    keys = (
        _select_pattern(index, selector)
        if isinstance(selector, str)
        else _select_where(index, name, selector)
    )
    members = [as_member(index, name, k) for k in keys]
    return sorted(members, key=lambda m: m.leaves[0])


def _select_pattern(index: Index, pattern: str) -> list[KeyPath]:
    parsed = parse_pattern(pattern)
    lengths = sequence_lengths(index) if needs_lengths(parsed) else None
    return [k for k in index.nodes if matches(parsed, k, lengths)]


def needs_lengths(parsed: Sequence[PatternSegment]) -> bool:
    """Whether a pattern has segments (`[-1]`, `[1:]`) that need the lengths of sequences."""
    return any(
        isinstance(s, Slice) or (isinstance(s, Key) and type(s.value) is int and s.value < 0)
        for s in parsed
    )


def sequence_lengths(index: Index) -> Any:
    """A function from a node's path to its length if it is a list or tuple (else None), counting
    the elements that hold no leaves (`None`, empty containers) too."""
    lengths: dict[KeyPath, int] = {}
    for keys in [*index.nodes, *empty_nodes(index)]:
        for depth, key in enumerate(keys):
            if isinstance(key, jax.tree_util.SequenceKey):
                parent = keys[:depth]
                lengths[parent] = max(lengths.get(parent, 0), key.idx + 1)
    return lengths.get


class _Marker:
    """Stands in for leaf `index` when a `where` function is given the model's structure."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _select_where(index: Index, name: str, where: Callable[[Any], Any]) -> list[KeyPath]:
    markers = [_Marker(i) for i in range(len(index.keypaths))]
    tree = jax.tree_util.tree_unflatten(index.treedef, markers)
    try:
        picked = where(tree)
    except Exception as error:
        raise ValueError(
            f"The `where` function of tie group {name!r} failed on the model's structure "
            f"({type(error).__name__}: {error}). It must only select nodes, e.g. "
            "`lambda m: [b.mlp for b in m.blocks]`, not compute with them."
        ) from error
    if isinstance(picked, Iterator | set | frozenset):
        raise ValueError(
            f"The `where` function of tie group {name!r} returned a {type(picked).__name__}. "
            "Return a node, or a list or tuple of nodes, e.g. "
            "`lambda m: [b.mlp for b in m.blocks]` (a list, not a generator)."
        )
    if isinstance(picked, list | tuple) and not picked:
        raise ValueError(
            f"The `where` function of tie group {name!r} returned an empty "
            f"{type(picked).__name__}, which selects no member. Return the nodes to tie, e.g. "
            "`lambda m: [b.mlp for b in m.blocks]`; an empty field of the model holds no arrays "
            "to tie."
        )
    picked = list(picked) if isinstance(picked, list | tuple) else [picked]
    if any(obj is None for obj in picked):
        raise ValueError(
            f"The `where` function of tie group {name!r} returned None, which holds no array "
            "(e.g. a Linear's bias with use_bias=False is None). Return nodes that hold arrays, "
            "and leave the None fields out."
        )
    wanted = {id(x): x for obj in picked for x in (obj, _inner_mapping(obj)) if x is not None}
    located: dict[int, KeyPath] = {}
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: id(x) in wanted)
    for path, obj in with_paths:
        if id(obj) in wanted:
            located.setdefault(id(obj), tuple(path))
    for obj in picked:  # by identity first, else the mapping a Flax NNX `State` branch wraps
        inner = _inner_mapping(obj)
        if id(obj) not in located and inner is not None and id(inner) in located:
            located[id(obj)] = located[id(inner)]
        if id(obj) in located:
            continue
        inside = _path_of(tree, obj)
        if inside is not None:
            raise ValueError(
                f"The `where` function of tie group {name!r} returned "
                f"{format_path(inside) or 'the whole model'} together with a node that "
                "contains it. Members of a group must not overlap: return either the "
                "subtrees or the leaves inside them."
            )
        raise ValueError(
            f"The `where` function of tie group {name!r} returned {type(obj).__name__}, "
            "which is not a node of the model. Return nodes of the model it is given, "
            "e.g. `lambda m: [b.mlp for b in m.blocks]`."
        )
    return list(dict.fromkeys(located[id(obj)] for obj in picked))


def _inner_mapping(obj: Any) -> Any:
    """The dict a Flax NNX `State` wraps, else None. `state["blocks"]` builds a new `State`
    around the pytree's inner dict on every read, so the `State` itself is never a node."""
    inner = getattr(obj, "raw_mapping", None)
    return inner if isinstance(inner, dict) else None


def empty_nodes(index: Index) -> list[KeyPath]:
    """Paths of the model's nodes that hold no leaves: `None`, empty containers, and modules
    without fields such as `eqx.nn.Identity()` (an element of a list all the same)."""
    leaf = object()
    tree = jax.tree_util.tree_unflatten(index.treedef, [leaf] * len(index.keypaths))

    def leafless(x: Any) -> bool:
        return x is not leaf and not jax.tree_util.tree_leaves(x, is_leaf=lambda y: y is leaf)

    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leafless)
    return [tuple(path) for path, node in with_paths if node is not leaf]


def as_member(index: Index, name: str, keys: KeyPath) -> Member:
    """The node at `keys` as a member of tie group `name`; raises if it holds no leaves."""
    leaves = index.nodes.get(keys, ())
    if not keys:
        raise ValueError(f"Tie group {name!r} selects the whole model; select its parts.")
    if not leaves:
        raise ValueError(f"Tie group {name!r} selects {format_path(keys)}, which holds no leaves.")
    relative = tuple(segments(index.keypaths[i])[len(keys) :] for i in leaves)
    return Member(format_path(keys), keys, leaves, relative)


def _path_of(tree: Any, obj: Any) -> KeyPath | None:
    """The path of `obj` in `tree` (compared by identity), or None if it is not a node of it."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is obj)
    return next((tuple(path) for path, leaf in with_paths if leaf is obj), None)


def full_shape(x: Any) -> tuple[int, ...] | None:
    """The shape `x` has in the full model (placeholders included); `None` for non-arrays."""
    if isinstance(x, StackedLeaf):
        data = getattr(x.data, "shape", None)
        return None if data is None else (len(x.rows), *tuple(data)[1:])
    if isinstance(x, TiedLeaf):
        return x.shape
    return leaf_type(x)[0] if eqx.is_array(x) else None


def full_type(x: Any) -> str:
    """`x`'s type in the full model, as messages print it (`f32[4,3]`)."""
    shape = full_shape(x)
    if isinstance(x, StackedLeaf):
        return format_type(shape or (), x.data.dtype)
    if isinstance(x, TiedLeaf):
        return format_type(x.shape, x.dtype)
    return format_type(*leaf_type(x)[:2])

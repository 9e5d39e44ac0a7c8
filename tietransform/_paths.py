"""Key paths as readable strings, and path patterns over them.

A path such as `blocks[3].mlp.layers[0].weight` is a sequence of *segments*
(`blocks`, `3`, `mlp`, `layers`, `0`, `weight`). A pattern is written the same way and may use

- `*` (or `[*]`) for any one segment, and shell-style globs inside a segment (`layer_*`);
- `**` for any number of segments, including none.

`blocks[*].mlp` and `blocks.*.mlp` are the same pattern. A pattern matches a *node* of the pytree
(a leaf or a whole subtree) when it matches that node's path exactly.
"""

import difflib
import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import jax


Segment = str
KeyPath = tuple[Any, ...]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"""\[\s*(?:'([^']*)'|"([^"]*)"|([^\]]*?))\s*\]|([^.\[\]]+)""")


def key_segment(key: Any) -> Segment:
    """The segment string of one jax path key (`GetAttrKey`, `DictKey`, `SequenceKey`, ...)."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def segments(path: KeyPath) -> tuple[Segment, ...]:
    """The segments of a jax key path."""
    return tuple(key_segment(key) for key in path)


def format_path(path: KeyPath) -> str:
    """A readable path: `blocks[3].mlp.weight`, `['my key']` for keys that are not identifiers."""
    out = []
    for key in path:
        if isinstance(key, jax.tree_util.SequenceKey | jax.tree_util.FlattenedIndexKey):
            out.append(f"[{key_segment(key)}]")
        elif isinstance(key, jax.tree_util.DictKey) and not (
            isinstance(key.key, str) and _IDENTIFIER.match(key.key)
        ):
            out.append(f"[{key.key!r}]")
        else:
            out.append(("." if out else "") + key_segment(key))
    return "".join(out) or "<root>"


def parse_pattern(pattern: str) -> tuple[Segment, ...]:
    """Splits a path pattern into segments; raises `ValueError` on a malformed pattern."""
    if not isinstance(pattern, str):
        raise TypeError(f"A path pattern must be a string, got {type(pattern).__name__}.")
    text = pattern.strip()
    if text.startswith("."):
        text = text[1:]
    out: list[Segment] = []
    position = 0
    for match in _TOKEN.finditer(text):
        gap = text[position : match.start()]
        if gap not in ("", "."):
            raise ValueError(f"Malformed path pattern {pattern!r} near {gap!r}.")
        quoted_single, quoted_double, bracketed, bare = match.groups()
        segment = next(s for s in (quoted_single, quoted_double, bracketed, bare) if s is not None)
        if segment == "":
            raise ValueError(f"Malformed path pattern {pattern!r}: empty segment.")
        out.append(segment)
        position = match.end()
    if text[position:] not in ("",) or not out:
        raise ValueError(
            f"Malformed path pattern {pattern!r}. Write paths like 'blocks[*].mlp' or "
            "'blocks.*.mlp.weight'."
        )
    return tuple(out)


def _segment_matches(pattern_segment: Segment, segment: Segment) -> bool:
    if pattern_segment == "*" or pattern_segment == segment:
        return True
    return any(c in pattern_segment for c in "*?[") and fnmatch.fnmatchcase(
        segment, pattern_segment
    )


def matches(pattern: Sequence[Segment], path: Sequence[Segment]) -> bool:
    """Whether `pattern` (parsed) matches `path` (segments) exactly."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(matches(rest, path[i:]) for i in range(len(path) + 1))
    return bool(path) and _segment_matches(head, path[0]) and matches(rest, path[1:])


def nearest(query: str, candidates: Sequence[str], count: int = 3) -> list[str]:
    """The candidate paths closest to `query`, for 'did you mean' hints."""
    return difflib.get_close_matches(query, list(dict.fromkeys(candidates)), n=count, cutoff=0.3)

"""Key paths as readable strings, and path patterns over them.

A path such as `blocks[3].mlp.layers[0].weight` is a sequence of *segments*, one per key of a jax
key path. A pattern is written the same way:

| segment            | selects                                                               |
|--------------------|-----------------------------------------------------------------------|
| `.name`, `name`    | the attribute or string key `name`; a shell glob (`layer_*`, `w?`)    |
| `*`, `[*]`         | any one key                                                           |
| `**`               | any number of keys, including none                                    |
| `['key']`, `["k"]` | exactly the string key written as a Python string literal (`['']`,     |
|                    | `['tab\\t']`, `['*']` are literal: quotes turn globs off)                 |
| `[3]`, `[-1]`      | the index 3 (or an int dict key); negative indices count from the end |
| `[1:]`, `[::2]`    | a slice of a list or tuple, with Python's semantics                   |
| `[(1, 'a')]`       | any other key written as a Python literal (tuples, floats, `None`)    |

`blocks[*].mlp` and `blocks.*.mlp` are the same pattern. A bare `[...]` is a key or an index, never
a character class. A pattern matches a *node* of the pytree (a leaf or a whole subtree) when it
matches that node's path exactly.

`format_path` writes every key so that the printed path, read back as a pattern, selects exactly
that node, except for keys that no Python literal spells (an enum member, an arbitrary object);
`writable` says which, and `where_source` spells a `where` function for them instead.
"""

import ast
import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax


Segment = str
KeyPath = tuple[Any, ...]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")
_ATTR, _DICT, _SEQ, _FLAT = (
    jax.tree_util.GetAttrKey,
    jax.tree_util.DictKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.FlattenedIndexKey,
)


@dataclasses.dataclass(frozen=True)
class Glob:
    """A bare segment: a shell glob over the key's text (`*` any key, `**` any keys)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Key:
    """A quoted or literal segment: exactly this key (a `str`, an `int` index, a tuple, ...)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Slice:
    """`[start:stop:step]`: the indices of a list or tuple that Python's slice selects."""

    start: int | None
    stop: int | None
    step: int | None


PatternSegment = Glob | Key | Slice


# -- printing ----------------------------------------------------------------------------------
def key_segment(key: Any) -> Segment:
    """The segment string of one jax path key (`GetAttrKey`, `DictKey`, `SequenceKey`, ...)."""
    if isinstance(key, _ATTR):
        return key.name
    if isinstance(key, _DICT):
        return str(key.key)
    if isinstance(key, _SEQ):
        return str(key.idx)
    if isinstance(key, _FLAT):
        return str(key.key)
    return str(key)


def segments(path: KeyPath) -> tuple[Segment, ...]:
    """The segments of a jax key path."""
    return tuple(key_segment(key) for key in path)


def _key_value(key: Any) -> Any:
    """What a key selects by: a name or dict key, an index; other key types by their text."""
    if isinstance(key, _ATTR):
        return key.name
    if isinstance(key, _DICT | _FLAT):
        return key.key
    if isinstance(key, _SEQ):
        return key.idx
    return str(key)


def _literal(value: Any) -> str | None:
    """`repr(value)` if it reads back (`ast.literal_eval`) as an equal value of the same type."""
    text = repr(value)
    try:
        back = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    same = type(back) is type(value) and back == value
    return text if same and "\n" not in text else None


def writable(key: Any) -> bool:
    """Whether `format_path` writes `key` as a pattern segment that selects exactly it."""
    value = _key_value(key)
    return isinstance(value, str) or _literal(value) is not None


def format_segment(key: Any, first: bool = False) -> str:
    """One key as a pattern segment: `.name` (`name` first), `[3]`, `['my key']`, `[(1, 2)]`."""
    value = _key_value(key)
    if isinstance(key, _SEQ | _FLAT) and isinstance(value, int):
        return f"[{value}]"
    if isinstance(value, str) and _IDENTIFIER.match(value):
        return value if first else f".{value}"
    text = _literal(value)
    return f"[{text if text is not None else repr(value)}]"


def format_path(path: KeyPath) -> str:
    """A readable path that reads back as a pattern selecting exactly it (see `writable`):
    `blocks[3].mlp.weight`, `['my key']`, `['']`, `[(1, 2)]`."""
    return "".join(format_segment(key, i == 0) for i, key in enumerate(path)) or "<root>"


def where_source(path: KeyPath) -> str:
    """A `where` function, as source text, that selects the node at `path`: for keys that no
    pattern can spell, such as an enum member used as a dict key."""
    text = "m"
    for key in path:
        value = _key_value(key)
        if isinstance(key, _ATTR) and _IDENTIFIER.match(value):
            text += f".{value}"
        elif isinstance(key, _ATTR):
            text = f"getattr({text}, {value!r})"
        elif isinstance(key, _SEQ) or _literal(value) is not None:
            text += f"[{_literal(value) or value}]"
        else:
            text = f"next(v for k, v in {text}.items() if repr(k) == {repr(value)!r})"
    return f"lambda m: {text}"


# -- parsing -----------------------------------------------------------------------------------
def parse_pattern(pattern: str) -> tuple[PatternSegment, ...]:
    """Splits a path pattern into segments; raises `ValueError` on a malformed pattern."""
    if not isinstance(pattern, str):
        raise TypeError(f"A path pattern must be a string, got {type(pattern).__name__}.")
    text = pattern.strip()
    position = 1 if text.startswith(".") else 0
    out: list[PatternSegment] = []
    while position < len(text):
        char = text[position]
        if char == "[":
            end = _closing_bracket(pattern, text, position)
            out.append(_bracketed(pattern, text[position + 1 : end]))
            position = end + 1
        elif char == "." and out:
            position += 1
            if position == len(text) or text[position] in ".]":
                raise ValueError(f"Malformed path pattern {pattern!r}: empty segment.")
        else:
            match = re.compile(r"[^.\[\]]+").match(text, position)
            if match is None:
                raise ValueError(
                    f"Malformed path pattern {pattern!r} near {text[position:]!r}. Write paths "
                    "like 'blocks[*].mlp' or 'blocks.*.mlp.weight'."
                )
            if out and text[position - 1] == "]":
                raise ValueError(
                    f"Malformed path pattern {pattern!r}: {match.group()!r} follows a ']' "
                    "without a '.'. A bare `[...]` is an index or a key (`blocks[0].mlp`), not "
                    "a character class; to match several names, use a glob segment (`layer_?`)."
                )
            out.append(Glob(match.group().strip()))
            position = match.end()
    if not out:
        raise ValueError(
            f"Malformed path pattern {pattern!r}: empty segment. Write paths like "
            "'blocks[*].mlp' or 'blocks.*.mlp.weight'."
        )
    return tuple(out)


def _closing_bracket(pattern: str, text: str, start: int) -> int:
    """The index of the `]` closing the `[` at `start`, skipping quoted strings and nesting."""
    depth, quote, position = 0, None, start
    while position < len(text):
        char = text[position]
        if quote is not None:
            if char == "\\":
                position += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
            if depth == 0:
                return position
        position += 1
    raise ValueError(
        f"Malformed path pattern {pattern!r}: the '[' at position {start} is not closed. Write "
        "paths like 'blocks[*].mlp' or \"['my key'].weight\"."
    )


def _bracketed(pattern: str, content: str) -> PatternSegment:
    """The segment `[content]` spells: a wildcard, a slice, a literal key, else a glob."""
    inner = content.strip()
    if inner in ("*", "**"):
        return Glob(inner)
    sliced = _SLICE.match(inner)
    if sliced:
        start, stop, step = (None if s is None else int(s) for s in sliced.groups())
        if step == 0:
            raise ValueError(f"Malformed path pattern {pattern!r}: slice step cannot be zero.")
        return Slice(start, stop, step)
    try:
        value = ast.literal_eval(inner)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = _NOT_LITERAL
    if value is not _NOT_LITERAL:
        return Key(value)
    if not inner:
        raise ValueError(f"Malformed path pattern {pattern!r}: empty segment `[]`.")
    if inner[:1] in ("'", '"'):
        raise ValueError(
            f"Malformed path pattern {pattern!r}: [{content}] is not a Python string literal. "
            "Write the key as Python writes it, e.g. ['tab\\t'] or [\"it's\"]."
        )
    raise ValueError(
        f"Malformed path pattern {pattern!r}: [{content}] is neither an index nor a key. A bare "
        "`[...]` holds an index (`[0]`, `[-1]`, `[1:]`), `[*]`, or a quoted key (`['name']`); "
        "it is not a character class. To match several names, use a glob segment "
        "(`layer_?`, `layer_*`) or list the paths."
    )


_NOT_LITERAL = object()


def is_wildcard(segment: PatternSegment) -> bool:
    """Whether `segment` may select more than one key (`*`, `**`, a glob, a slice)."""
    if isinstance(segment, Glob):
        return any(c in segment.text for c in "*?")
    return isinstance(segment, Slice)


# -- matching ----------------------------------------------------------------------------------
Lengths = Callable[[KeyPath], int | None]
"""The length of the list or tuple at a path (its `SequenceKey` children), for `[-1]` and `[1:]`."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _glob_text(key: Any) -> str | None:
    """The text a bare segment globs over: a name or string key, an index or int key. Other keys
    (tuples, `None`, floats) have none, so only `*` and `**` select them by glob."""
    value = _key_value(key)
    return value if isinstance(value, str) else str(value) if _is_int(value) else None


def _same_kind(a: Any, b: Any) -> bool:
    """`1` selects the key `1`, not `True` or `1.0` (equal in Python); `'1'` never selects `1`."""
    return type(a) is type(b) or (_is_int(a) and _is_int(b))


def _segment_matches(
    segment: PatternSegment, key: Any, parent: KeyPath, lengths: Lengths | None
) -> bool:
    if isinstance(segment, Glob):
        if segment.text == "*":
            return True
        text = _glob_text(key)
        return text is not None and (
            text == segment.text
            or (any(c in segment.text for c in "*?") and fnmatch.fnmatchcase(text, segment.text))
        )
    value = _key_value(key)
    if isinstance(segment, Key):
        if not isinstance(key, _SEQ) or not _is_int(segment.value) or segment.value >= 0:
            return value == segment.value and _same_kind(value, segment.value)
        length = lengths(parent) if lengths is not None else None
        return length is not None and value == length + segment.value
    if not isinstance(key, _SEQ):
        return False
    length = lengths(parent) if lengths is not None else None
    return (
        length is not None
        and value in range(length)[slice(segment.start, segment.stop, segment.step)]
    )


def matches(
    pattern: Sequence[PatternSegment], keys: KeyPath, lengths: Lengths | None = None
) -> bool:
    """Whether `pattern` (parsed) matches the key path `keys` exactly."""
    return _matches(tuple(pattern), tuple(keys), 0, lengths)


def _matches(pattern: tuple, keys: KeyPath, depth: int, lengths: Lengths | None) -> bool:
    if not pattern:
        return depth == len(keys)
    head, rest = pattern[0], pattern[1:]
    if head == Glob("**"):
        return any(_matches(rest, keys, d, lengths) for d in range(depth, len(keys) + 1))
    return (
        depth < len(keys)
        and _segment_matches(head, keys[depth], keys[:depth], lengths)
        and _matches(rest, keys, depth + 1, lengths)
    )


def nearest(query: str, candidates: Sequence[str], count: int = 3) -> list[str]:
    """The candidate paths closest to `query`, for 'did you mean' hints."""
    return difflib.get_close_matches(query, list(dict.fromkeys(candidates)), n=count, cutoff=0.3)

"""Layout records: what a placeholder remembers about the layout it was packed under.

A *layout* says how one placeholder's leaf is rebuilt: for a `TiedLeaf`, its group's kind, name,
members, canonical member and view function; for a `StackedLeaf`, each of its groups' tied slices
and kept slice. It is kept twice:

- as static aux data of the placeholder (`layout`), which a loader takes from its skeleton;
- as data: the placeholder's one extra child, a zero-size float32 array (the *record*) whose
  shape `(0, k1, k2, k3)` is a fingerprint of the layout. A loader fills it from the file,
  so it says what the arrays were packed under. Zero elements: no bytes, nothing for an
  optimizer or weight decay to change, a zero-size gradient; its shape is static under `jit`,
  so it is checked at trace time, and loaders that compare shapes (`eqx.tree_deserialise_leaves`)
  refuse a file whose layouts differ from the skeleton's.

The record's pytree key is `layout_<fingerprint>`, so key-path based checkpointers (orbax) see the
layout in the key even when the zero-size record itself is left out of the file.
"""

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp


Layout = tuple[Any, ...]
"""A hashable description of a layout, e.g. `("tie", "ffn", members, canonical, None)`."""

RECORD_KEY = re.compile(r"^layout_[0-9a-f]{16}$")


def fn_name(fn: Callable[..., Any] | None) -> str | None:
    """A stable name for a view function: its qualified name (no memory addresses)."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        args = [_simple_repr(a) for a in fn.args]
        args += [f"{k}={_simple_repr(v)}" for k, v in sorted(fn.keywords.items())]
        return f"partial({', '.join([str(fn_name(fn.func)), *args])})"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _simple_repr(x: Any) -> str:
    if isinstance(x, bool | int | float | str | type(None)):
        return repr(x)
    if isinstance(x, tuple | list):
        return "(" + ", ".join(_simple_repr(v) for v in x) + ")"
    return type(x).__qualname__


def tie_layout(kind: str, group: str, members: Sequence[str], canonical: str, fn: Any) -> Layout:
    """The layout of a plain tie (`kind="tie"`) or a view (`kind="view"`)."""
    return (kind, group, tuple(members), canonical, fn_name(fn))


def stack_layout(length: int, slices: dict[str, tuple[int, ...]], kept: dict[str, int]) -> Layout:
    """The layout of a stacked array of `length` slices: per group, its slices and kept slice."""
    return ("stack", int(length), tuple((g, tuple(s), int(kept[g])) for g, s in slices.items()))


@functools.lru_cache(maxsize=4096)  # checked for every placeholder on every (traced) call
def fingerprint(layout: Layout, source: str = "") -> str:
    """16 hex digits from a stable hash of `layout` (and a TiedLeaf's source leaf path)."""
    text = repr((layout, source)).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


# Every non-zero dimension of a record is a multiple of this (2^8 * 3 * 5), so that sharding a
# record's axis over a mesh axis of 2, 3, 4, 5, 6, 8, ... 256 devices divides evenly, as when one
# sharding is applied to every leaf of packed params. Dimensions stay below 2^20 (XLA's strides
# of a rank-4 shape stay far from int64 overflow).
_MULTIPLE = 3840


def record_shape(fingerprint_hex: str) -> tuple[int, ...]:
    """The shape `(0, k1, k2, k3)` of the record of a fingerprint: each `k` is `3840 * (b + 1)`
    for one byte `b` of the fingerprint (24 bits in all; the pytree key holds all 64)."""
    return (0, *(_MULTIPLE * (b + 1) for b in bytes.fromhex(fingerprint_hex)[:3]))


def record_key(fingerprint_hex: str) -> str:
    return f"layout_{fingerprint_hex}"


def new_record(fingerprint_hex: str) -> Any:
    """A fresh zero-size record (one per placeholder: a buffer is never donated twice)."""
    return jnp.zeros(record_shape(fingerprint_hex), jnp.float32)


def record_of(x: Any) -> tuple[int, ...] | None:
    """The shape of a record as loaded (array, tracer or `ShapeDtypeStruct`), else None."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else None


def _few(items: Sequence[str]) -> str:
    shown = list(items)
    if len(shown) > 4:
        shown = [*shown[:2], f"... ({len(shown) - 3} more)", shown[-1]]
    return ", ".join(shown)


def format_layout(layout: Layout | None) -> str:
    """A readable one-line description of a layout."""
    if not layout:
        return "no recorded layout"
    if layout[0] == "stack":
        _, length, groups = layout
        parts = [f"group {g!r} ties slices {list(s)} keeping {k}" for g, s, k in groups]
        return f"stack of {length} slices: " + "; ".join(parts)
    kind, group, members, canonical, fn = layout
    if kind == "view":
        targets = [m for m in members if m != canonical]
        return f"view {group!r}: {_few(targets)} = {fn}({canonical})"
    return f"tie group {group!r} of {_few(members)} (canonical {canonical})"

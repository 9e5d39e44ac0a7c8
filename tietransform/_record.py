"""Layout records: what packed params remember about the layout they were packed under.

A *layout* says how placeholders are rebuilt: for a plain tie or view group, its kind, name,
members, canonical member and view function; for a `StackedLeaf`, each of its groups' tied slices
and kept slice. It is kept twice:

- as static aux data of every placeholder (`layout`), which a loader takes from its skeleton;
- as data: ONE zero-size float32 array per tie group (and per stacked array), the *record*,
  held by the group's first placeholder. Its shape `(lead, 0, k1, k2)` ends in a fingerprint of
  the layout; `lead` is the leading axis of the buffer it describes (1 for a scalar), so that
  mapping packed params over their leading axis (`jax.vmap` of an ensemble) and sharding them
  leaf by leaf treat the record as they treat its buffer. A loader fills the record from the
  file, so it says what the arrays were packed under. Zero elements: no bytes, nothing for an
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

import jax
import numpy as np


class HashOnce(tuple):
    """A tuple whose hash is computed once. Placeholders' static data is hashed by `jax.jit` and
    `eqx.filter_jit` on every call, and a group's member list can be long (a 32-block model:
    124 placeholders of 32 members each, 0.1 ms per call uncached)."""

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = self.__dict__["_hash"] = tuple.__hash__(self)
        return cached


class Layout(HashOnce):
    """A hashable description of a layout, e.g. `("tie", "ffn", members, canonical, None)`;
    every placeholder carries one as static aux data."""


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


def tie_layout(
    kind: str,
    group: str,
    members: Sequence[str],
    canonical: str,
    fn: Any,
    relaxed: str | None = None,
) -> Layout:
    """The layout of a plain tie (`kind="tie"`) or a view (`kind="view"`); a relaxed tie's kind
    is `"relaxed"` and its last entry says its rank (`relaxed_layout`)."""
    if relaxed is not None:
        return Layout(("relaxed", group, tuple(members), canonical, relaxed))
    return Layout((kind, group, tuple(members), canonical, fn_name(fn)))


def relaxed_layout(rank: int, others: str) -> str:
    """What a relaxed group's layout says of its relaxation: `rank=8 others=shared`."""
    return f"rank={int(rank)} others={others}"


def stack_layout(
    length: int,
    slices: dict[str, tuple[int, ...]],
    kept: dict[str, int],
    relaxed: dict[str, str] | None = None,
) -> Layout:
    """The layout of a stacked array of `length` slices: per group, its slices and kept slice
    (and, for a relaxed group, its `relaxed_layout`)."""
    relaxed = relaxed or {}
    groups = tuple(
        (g, tuple(s), int(kept[g]), *([relaxed[g]] if g in relaxed else []))
        for g, s in slices.items()
    )
    return Layout(("stack", int(length), groups))


@functools.lru_cache(maxsize=4096)  # checked for every group on every (traced) call
def fingerprint(layout: Layout) -> str:
    """16 hex digits from a stable hash of `layout`."""
    text = repr(layout).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


# Each fingerprint dimension of a record is a multiple of this (2^8 * 3 * 5), so that sharding
# any axis of a record over a mesh axis of 2, 3, 4, 5, 6, 8, ... 256 devices divides evenly.
# Dimensions stay below 2^20, so that strides stay far from int64 overflow.
_MULTIPLE = 3840
_FINGERPRINT_DIMS = 2  # 16 bits of the fingerprint in the shape (the pytree key holds all 64)
RECORD_NDIM = 2 + _FINGERPRINT_DIMS  # (lead, 0, k1, k2)


def record_shape(fingerprint_hex: str, lead: int = 1) -> tuple[int, ...]:
    """The shape `(lead, 0, k1, k2)` of the record of a fingerprint: each `k` is `3840 * (b + 1)`
    for one byte `b` of the fingerprint; `lead` is the leading axis of the recorded buffer."""
    data = bytes.fromhex(fingerprint_hex)[:_FINGERPRINT_DIMS]
    return (int(lead), 0, *(_MULTIPLE * (b + 1) for b in data))


# NumPy and XLA refuse an array whose non-zero dimensions multiply (times 4 bytes) past 2^63:
# with two fingerprint dimensions below 2^20, a lead up to 2^20 stays below that.
_MAX_LEAD = 1 << 20


def record_lead(buffer_shape: tuple[int, ...]) -> int:
    """The leading axis a record shares with its buffer: 1 for a scalar buffer, and for a
    leading axis over 2^20 (no ensemble is that large; the record's shape must stay valid)."""
    return int(buffer_shape[0]) if buffer_shape and buffer_shape[0] <= _MAX_LEAD else 1


def fingerprint_of_record(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The fingerprint part of a record's shape: what is left after its leading axis, which
    `jax.vmap` over packed params strips (`(0, k1, k2)` either way)."""
    return tuple(shape[-(RECORD_NDIM - 1) :])


def record_bits(layout: Layout) -> tuple[int, ...]:
    """The fingerprint part of the record shape `layout` gives (see `fingerprint_of_record`)."""
    return fingerprint_of_record(record_shape(fingerprint(layout)))


def is_record_shape(shape: tuple[int, ...]) -> bool:
    """Whether `shape` is a layout record's, `(lead, 0, k1, k2)`."""
    return (
        len(shape) == RECORD_NDIM and shape[1] == 0 and all(d % _MULTIPLE == 0 for d in shape[2:])
    )


def record_key(fingerprint_hex: str) -> str:
    return f"layout_{fingerprint_hex}"


def new_record(fingerprint_hex: str, lead: int = 1) -> Any:
    """A fresh zero-size record, made without compiling anything (no device computation)."""
    return jax.device_put(np.zeros(record_shape(fingerprint_hex, lead), np.float32))


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
        parts = [
            f"group {g!r} ties slices {list(s)} keeping {k}"
            + (f" relaxed ({rest[0]})" if rest else "")
            for g, s, k, *rest in groups
        ]
        return f"stack of {length} slices: " + "; ".join(parts)
    kind, group, members, canonical, fn = layout
    if kind == "relaxed":
        return f"relaxed tie group {group!r} of {_few(members)} (shared W at {canonical}, {fn})"
    if kind == "view":
        targets = [m for m in members if m != canonical]
        return f"view {group!r}: {_few(targets)} = {fn}({canonical})"
    return f"tie group {group!r} of {_few(members)} (canonical {canonical})"

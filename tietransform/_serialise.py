"""Loaders that name the tie groups when a checkpoint was saved under another spec than the
skeleton's: `tree_deserialise_leaves` (Equinox's) and `orbax_restore`.

Equinox refuses such a file itself (a layout record's shape on disk differs from the skeleton's)
but can only say which leaf changed shape. The file is a sequence of `.npy` arrays, one per array
leaf of the saved tree, so the layout records it holds can be read back from their headers (no
data is read) and compared with the skeleton's groups. Orbax refuses a target of another layout
by its tree structure; its metadata keeps every record's key, `layout_<fingerprint>`.
"""

import os
from collections.abc import Iterator
from typing import IO, Any, TypeVar

import equinox as eqx
import jax
import numpy as np

from ._placeholders import RelaxedLeaf, StackedLeaf, TiedLeaf
from ._record import fingerprint_of_record, format_layout, is_record_shape, record_bits


PyTree = TypeVar("PyTree")


def tree_deserialise_leaves(path_or_file: str | os.PathLike | IO[bytes], like: PyTree) -> PyTree:
    """Load packed params saved with `eqx.tree_serialise_leaves`, as
    `eqx.tree_deserialise_leaves(path_or_file, like)` does.

    **Arguments:**

    - `path_or_file`: the file (a path, or a binary file object that can seek).
    - `like`: a skeleton packed under the spec the file was saved with, e.g.
      `tt.pack(Model(key), spec)` or its `eqx.filter_eval_shape`.

    **Returns:**

    The loaded packed params, the structure of `like`.

    **Raises:**

    `ValueError` naming each tie group of `like` whose layout the file does not hold, when the
    file was saved under another spec (other members, canonical member, view or stacked slices),
    with how to load and convert it. Any other failure is Equinox's own error.
    """
    start = None if isinstance(path_or_file, str | os.PathLike) else path_or_file.tell()
    try:
        return eqx.tree_deserialise_leaves(path_or_file, like)
    except (RuntimeError, ValueError) as error:
        message = _layout_difference(path_or_file, like, start)
        if message is None:
            raise
        raise ValueError(message) from error


def orbax_restore(checkpointer: Any, directory: Any, target: PyTree) -> PyTree:
    """`checkpointer.restore(directory, target)` for an orbax checkpointer, naming the tie groups
    that differ when the checkpoint was saved under another spec than `target`'s.

    **Arguments:**

    - `checkpointer`: an orbax checkpointer, e.g. `orbax.checkpoint.StandardCheckpointer()`.
    - `directory`: the checkpoint's directory.
    - `target`: what to restore into, packed under the spec it was saved with (the non-empty
      arrays, as the checkpoints guide saves them).

    **Raises:**

    `ValueError` naming each tie group of `target` whose layout key the checkpoint does not hold,
    with how to load and convert it; any other failure is orbax's own error.
    """
    try:
        return checkpointer.restore(directory, target)
    except ValueError as error:
        try:
            metadata = checkpointer.metadata(directory)
        except Exception:
            raise error from None  # no metadata to compare: orbax's own message
        tree = getattr(metadata, "item_metadata", metadata)
        saved = {
            key.key
            for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
            for key in path
            if isinstance(getattr(key, "key", None), str) and key.key.startswith("layout_")
        }
        expected = {
            f"layout_{leaf.fingerprint}": format_layout(leaf.layout)
            for leaf in _placeholders(target)
            if leaf.fingerprint is not None
        }
        missing = [text for key, text in expected.items() if key not in saved]
        if not missing:
            raise
        message = _mismatch_message(directory, missing, len(saved - set(expected)), "orbax")
        raise ValueError(message) from error


def _is_none(x: Any) -> bool:
    return x is None


def _placeholders(tree: Any) -> list[Any]:
    kinds = (TiedLeaf, StackedLeaf, RelaxedLeaf)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kinds))
    return [x for x in leaves if isinstance(x, kinds)]


def _mismatch_message(where: Any, missing: list[str], extra: int, loader: str) -> str:
    listed = "\n".join(f"  {text}" for text in dict.fromkeys(missing))
    load = (
        "`tt.orbax_restore(checkpointer, path, target)` with `target` packed under `saved_spec`"
        if loader == "orbax"
        else "`tt.tree_deserialise_leaves(path, tt.pack(model, saved_spec))`"
    )
    what = "`target`" if loader == "orbax" else "`like`"
    return (
        f"The checkpoint {where} was saved under another tie layout than {what} was packed "
        f"under. It holds no layout record for these groups of {what}:\n{listed}\n"
        + (f"It holds {extra} layout record(s) that {what} does not make.\n" if extra else "")
        + f"Load it under the spec it was saved with, {load}, then convert: "
        "`tt.pack(tt.unpack(params, saved_spec), spec)`."
    )


def _layout_difference(path_or_file: Any, like: Any, start: int | None) -> str | None:
    """What differs between the file's layout records and `like`'s, or None if nothing does."""
    # The records in tree order, as the file holds them: one layout can recur (a relaxed
    # stack's bias keeps the strict stack's layout), so they are compared position by position.
    expected = [
        (record_bits(leaf.layout), format_layout(leaf.layout))
        for leaf in _placeholders(like)
        if leaf.record is not None and leaf.layout
    ]
    try:
        shapes = list(_saved_shapes(path_or_file, start))
    except (OSError, ValueError, KeyError):
        return None  # not a file of .npy arrays: leave the message to Equinox
    saved_in_order = [fingerprint_of_record(s) for s in shapes if is_record_shape(s)]
    saved = set(saved_in_order)
    missing = [
        text
        for position, (bits, text) in enumerate(expected)
        if position >= len(saved_in_order) or saved_in_order[position] != bits
    ]
    if not missing:
        return None
    name = path_or_file if isinstance(path_or_file, str | os.PathLike) else "the file"
    return _mismatch_message(name, missing, len(saved - {bits for bits, _ in expected}), "eqx")


def _saved_shapes(path_or_file: Any, start: int | None) -> Iterator[tuple[int, ...]]:
    """The shapes of the `.npy` arrays in a file written by `eqx.tree_serialise_leaves`, read
    from the file's start (a path) or from where the caller's file object was (`start`)."""
    if isinstance(path_or_file, str | os.PathLike):
        with open(path_or_file, "rb") as f:
            yield from _npy_shapes(f)
    else:
        path_or_file.seek(start or 0)
        yield from _npy_shapes(path_or_file)


def _npy_shapes(f: IO[bytes]) -> Iterator[tuple[int, ...]]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0}
    readers[(2, 0)] = np.lib.format.read_array_header_2_0
    while f.peek(1) if hasattr(f, "peek") else _not_at_end(f):
        version = np.lib.format.read_magic(f)
        shape, _, dtype = readers[version](f)
        yield tuple(shape)
        f.seek(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, os.SEEK_CUR)


def _not_at_end(f: IO[bytes]) -> bool:
    here = f.tell()
    more = bool(f.read(1))
    f.seek(here)
    return more

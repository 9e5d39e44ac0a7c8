"""The nodes that stand in for tied leaves in a packed pytree.

Both are pytree nodes, so JAX transformations, optimizers and serialisers see exactly one array per
tie: a `TiedLeaf` has no children at all, and a `StackedLeaf` has one child, the deduplicated rows
of a stacked array. Everything they record (group, source path, shape, dtype) is static aux data,
so packing a rebuilt model gives an equal treedef and `jax.jit` does not retrace.
"""

from typing import Any

import jax
import numpy as np

from ._errors import format_type


@jax.tree_util.register_pytree_node_class
class TiedLeaf:
    """Marks a leaf of a packed pytree that reads another leaf's buffer.

    **Attributes:**

    - `group`: the tie group's name.
    - `source`: the path of the canonical leaf (the view's source leaf for views).
    - `shape`, `dtype`, `weak_type`: the type this leaf has when unpacked.
    """

    __slots__ = ("group", "source", "shape", "dtype", "weak_type")

    def __init__(
        self, group: str, source: str, shape: tuple[int, ...], dtype: Any, weak_type: bool
    ):
        self.group = group
        self.source = source
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.weak_type = bool(weak_type)

    def _key(self) -> tuple[Any, ...]:
        return (self.group, self.source, self.shape, self.dtype.name, self.weak_type)

    def tree_flatten(self) -> tuple[tuple[()], tuple[Any, ...]]:
        return (), self._key()

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[()]) -> "TiedLeaf":
        del children
        return cls(*aux)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TiedLeaf) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        kind = format_type(self.shape, self.dtype, self.weak_type)
        return f"TiedLeaf(group={self.group!r}, source={self.source!r}, {kind})"


@jax.tree_util.register_pytree_node_class
class StackedLeaf:
    """A stacked array of shape `(L, ...)` some of whose slices are tied.

    **Attributes:**

    - `data`: the distinct slices, shape `(R, ...)` with `R <= L`.
    - `rows`: static, length `L`: slice `i` of the full array is `data[rows[i]]`.
    - `groups`: static, the names of the tie groups on this array.
    - `weak_type`: whether the full array is weakly typed.
    """

    __slots__ = ("data", "rows", "groups", "weak_type")

    def __init__(self, data: Any, rows: tuple[int, ...], groups: tuple[str, ...], weak_type: bool):
        self.data = data
        self.rows = tuple(int(r) for r in rows)
        self.groups = tuple(groups)
        self.weak_type = bool(weak_type)

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
        return (self.data,), (self.rows, self.groups, self.weak_type)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any]) -> "StackedLeaf":
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        data = getattr(self.data, "shape", self.data)
        return f"StackedLeaf(groups={self.groups}, rows={self.rows}, data={data})"


def is_placeholder(x: Any) -> bool:
    """Whether `x` stands in for a leaf of the full pytree (`TiedLeaf` or `StackedLeaf`)."""
    return isinstance(x, TiedLeaf | StackedLeaf)

"""The nodes that stand in for tied leaves in a packed pytree.

Both are pytree nodes, so JAX transformations, optimizers and serialisers see exactly one array per
tie: a `TiedLeaf` has one child, its zero-size layout record, and a `StackedLeaf` has two, the
deduplicated rows of a stacked array (`.data`) and its record. Everything else they know (group,
source path, shape, dtype, layout) is static aux data, so packing a rebuilt model gives an equal
treedef and `jax.jit` does not retrace. The record (see `_record.py`) is data, so a checkpoint
loader fills it from the file: it says which layout the loaded arrays were packed under.

They are not arrays: arithmetic, indexing, iteration and conversion (`np.asarray`,
`jnp.asarray`) raise a `TypeError` that says to call the model through `tt.tie` or to `tt.unpack`
it first. (`jnp` functions such as `jnp.tanh(placeholder)` raise JAX's own `TypeError` naming the
type: JAX 0.10-0.12 no longer call `__jax_array__` there, so no hook gives a better message.)
"""

from typing import Any

import jax
import numpy as np

from ._errors import format_type
from ._record import RECORD_KEY, Layout, fingerprint, format_layout, record_key


def _not_an_array(self: Any, *args: Any, **kwargs: Any) -> Any:
    del args, kwargs
    raise TypeError(_not_an_array_message(self))


def _not_an_array_message(x: Any) -> str:
    return (
        f"{x!r} is a placeholder in packed params, not an array: its values live in its tie "
        "group's buffer. Call the model through the tied function, `tt.tie(fn, spec)(packed, "
        "...)`, or rebuild the full model first with `tt.unpack(packed, spec)`."
    )


_ARRAY_METHODS = [
    f"__{op}__"
    for name in (
        "add sub mul matmul truediv floordiv mod divmod pow and or xor lshift rshift".split()
    )
    for op in (name, "r" + name)
] + "__neg__ __pos__ __abs__ __invert__ __getitem__ __iter__ __array__ __float__ __int__".split()
# Attributes of arrays that code holding a placeholder by mistake reaches for.
_ARRAY_ATTRIBUTES = frozenset(
    "T mT ndim size at astype reshape transpose sum mean max min squeeze ravel flatten".split()
)


class _Placeholder:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if RECORD_KEY.match(name):  # the record's pytree key names it `layout_<fingerprint>`
            return object.__getattribute__(self, "record")
        if name in _ARRAY_ATTRIBUTES:
            raise AttributeError(_not_an_array_message(self))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _record_key(self) -> Any:
        fp = self.fingerprint
        return jax.tree_util.GetAttrKey(record_key(fp) if fp else "record")

    @property
    def fingerprint(self) -> str | None:
        raise NotImplementedError


for _method in _ARRAY_METHODS:
    setattr(_Placeholder, _method, _not_an_array)


class TiedLeaf(_Placeholder):
    """Marks a leaf of a packed pytree that reads another leaf's buffer.

    **Attributes:**

    - `group`: the tie group's name.
    - `source`: the path of the canonical leaf (the view's source leaf for views).
    - `shape`, `dtype`, `weak_type`: the type this leaf has when unpacked.
    - `layout`: static, the layout it was packed under (group kind, members, canonical, view).
    - `record`: the layout record, a zero-size float32 array whose shape fingerprints the layout
      the arrays were packed under (its pytree key is `layout_<fingerprint>`).
    """

    __slots__ = ("group", "source", "shape", "dtype", "weak_type", "layout", "record")

    def __init__(
        self,
        group: str,
        source: str,
        shape: tuple[int, ...],
        dtype: Any,
        weak_type: bool,
        layout: Layout | None = None,
        record: Any = None,
    ):
        self.group = group
        self.source = source
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.weak_type = bool(weak_type)
        self.layout = layout
        self.record = record

    @property
    def fingerprint(self) -> str | None:
        return None if self.layout is None else fingerprint(self.layout, self.source)

    def _key(self) -> tuple[Any, ...]:
        return (self.group, self.source, self.shape, self.dtype.name, self.weak_type, self.layout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TiedLeaf) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        kind = format_type(self.shape, self.dtype, self.weak_type)
        return f"TiedLeaf(group={self.group!r}, source={self.source!r}, {kind})"


def _flatten_tied(x: TiedLeaf) -> tuple[tuple[tuple[Any, Any]], tuple[Any, ...]]:
    return ((x._record_key(), x.record),), x._key()


def _unflatten_tied(aux: tuple[Any, ...], children: Any) -> TiedLeaf:
    (record,) = children
    return TiedLeaf(*aux, record=record)


jax.tree_util.register_pytree_with_keys(
    TiedLeaf,
    _flatten_tied,
    _unflatten_tied,
    flatten_func=lambda x: ((x.record,), x._key()),
)


class StackedLeaf(_Placeholder):
    """A stacked array of shape `(L, ...)` some of whose slices are tied.

    **Attributes:**

    - `data`: the distinct slices, shape `(R, ...)` with `R <= L`.
    - `rows`: static, length `L`: slice `i` of the full array is `data[rows[i]]`.
    - `groups`: static, the names of the tie groups on this array.
    - `weak_type`: whether the full array is weakly typed.
    - `layout`: static, the layout it was packed under (each group's slices and kept slice).
    - `record`: the layout record, as for [`tietransform.TiedLeaf`][].
    """

    __slots__ = ("data", "rows", "groups", "weak_type", "layout", "record")

    def __init__(
        self,
        data: Any,
        rows: tuple[int, ...],
        groups: tuple[str, ...],
        weak_type: bool,
        layout: Layout | None = None,
        record: Any = None,
    ):
        self.data = data
        self.rows = tuple(int(r) for r in rows)
        self.groups = tuple(groups)
        self.weak_type = bool(weak_type)
        self.layout = layout
        self.record = record

    @property
    def fingerprint(self) -> str | None:
        return None if self.layout is None else fingerprint(self.layout)

    def _aux(self) -> tuple[Any, ...]:
        return (self.rows, self.groups, self.weak_type, self.layout)

    def __repr__(self) -> str:
        data = getattr(self.data, "shape", self.data)
        return f"StackedLeaf(groups={self.groups}, rows={self.rows}, data={data})"


def _flatten_stacked(x: StackedLeaf) -> tuple[tuple[tuple[Any, Any], ...], tuple[Any, ...]]:
    return ((jax.tree_util.GetAttrKey("data"), x.data), (x._record_key(), x.record)), x._aux()


def _unflatten_stacked(aux: tuple[Any, ...], children: Any) -> StackedLeaf:
    data, record = children
    rows, groups, weak_type, layout = aux
    return StackedLeaf(data, rows, groups, weak_type, layout, record)


jax.tree_util.register_pytree_with_keys(
    StackedLeaf,
    _flatten_stacked,
    _unflatten_stacked,
    flatten_func=lambda x: ((x.data, x.record), x._aux()),
)


def is_restored_placeholder(x: Any) -> bool:
    """Whether `x` is what a checkpointer restoring *without a target* makes of a placeholder:
    a plain dict holding its layout record under its key `layout_<fingerprint>` (and `data`)."""
    if type(x) is not dict or not x or len(x) > 2:
        return False
    records = [k for k in x if isinstance(k, str) and RECORD_KEY.match(k)]
    return len(records) == 1 and all(k == "data" or k in records for k in x)


def is_placeholder(x: Any) -> bool:
    """Whether `x` stands in for a leaf of the full pytree: a `TiedLeaf` or `StackedLeaf`, or the
    dict a target-less restore made of one (so that `unpack` and `tie` can refuse it clearly)."""
    return isinstance(x, TiedLeaf | StackedLeaf) or is_restored_placeholder(x)


def describe_record(x: Any) -> str:
    """What a placeholder's static layout says, for messages."""
    return format_layout(getattr(x, "layout", None))

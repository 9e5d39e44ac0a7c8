"""The nodes that stand in for tied leaves in a packed pytree.

Both are frozen dataclasses and pytree nodes, so JAX transformations, optimizers and serialisers
see one array per buffer: a `StackedLeaf` holds the deduplicated rows of a stacked array (key
path `.data`), and one placeholder per tie group (its first member; each `StackedLeaf`) also holds
the group's zero-size layout record (key path `.layout_<fingerprint>`, see `_register`); every
other `TiedLeaf` holds no array at all. Their other fields (group, source path, shape, dtype,
rows, layout) are static aux data, so packing a rebuilt model gives an equal treedef and
`jax.jit` does not retrace. The record (see `_record.py`) is data, so a checkpoint loader fills
it from the file: it says which layout the loaded arrays were packed under.

Printed (`repr`, `eqx.tree_pformat`, the repr of a gradient or optimizer state), a placeholder is
one line: its type when unpacked, its group, and where its value lives.

They are not arrays: arithmetic, indexing, iteration and conversion (`np.asarray`,
`jnp.asarray`) raise a `TypeError` that says to call the model through `tt.tie` or to `tt.unpack`
it first. (`jnp` functions such as `jnp.tanh(placeholder)` raise JAX's own `TypeError` naming the
type: JAX 0.10-0.12 no longer call `__jax_array__` there, so no hook gives a better message.)
"""

import dataclasses
import operator
from typing import Any, TypeVar, cast

import jax
import numpy as np

from ._errors import format_type
from ._record import RECORD_KEY, HashOnce, Layout, fingerprint, format_layout, record_key


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

    @property
    def fingerprint(self) -> str | None:
        raise NotImplementedError

    def __pdoc__(self, **kwargs: Any) -> Any:
        """One line in Equinox's tree printing (wadler_lindig), as in `repr`."""
        del kwargs
        import wadler_lindig

        return wadler_lindig.TextDoc(repr(self))


for _method in _ARRAY_METHODS:
    setattr(_Placeholder, _method, _not_an_array)


_P = TypeVar("_P", bound=_Placeholder)


def _static(**kwargs: Any) -> Any:
    """A static field, marked the way `jax.tree_util.register_dataclass` reads it."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _register(cls: type[_P]) -> type[_P]:
    """Register a placeholder dataclass as a pytree: its `static` fields are aux data, the others
    children, each keyed by its field name, except the record, keyed `layout_<fingerprint>`.

    This is what `jax.tree_util.register_dataclass(cls)` would do but for that one key: JAX names
    a dataclass's children by field name only, and the record's key must carry the layout. Orbax
    leaves the zero-size records out of a checkpoint but keeps their keys, so the key is the only
    part of the layout a file keeps: with a fixed key `record`, orbax would restore a checkpoint
    into a target packed under another spec without a word, and `eqx.combine` would then give
    arrays of one layout the records of the other, which no later check could catch.
    """
    fields = [f for f in dataclasses.fields(cast(Any, cls)) if f.name != "_aux"]
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    static = tuple(f.name for f in fields if f.metadata.get("static"))

    def key(x: Any, name: str) -> Any:
        if name == "record" and x.fingerprint:
            name = record_key(x.fingerprint)
        return jax.tree_util.GetAttrKey(name)

    def flatten_with_keys(x: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        children = [(key(x, name), getattr(x, name)) for name in data]
        return children, tuple(getattr(x, name) for name in static)

    # `flatten` runs for every placeholder on every jitted call, and jit hashes the aux data it
    # returns: C-level attribute getters, and one aux tuple per placeholder that hashes once.
    get_data, get_static = operator.attrgetter(*data, "__class__"), operator.attrgetter(*static)

    def flatten(x: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        aux = x._aux
        if aux is None:
            aux = HashOnce(get_static(x))
            object.__setattr__(x, "_aux", aux)
        return get_data(x)[:-1], aux

    def unflatten(aux: tuple[Any, ...], children: Any) -> Any:
        return cls(**dict(zip(static, aux, strict=True)), **dict(zip(data, children, strict=True)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


@_register
@dataclasses.dataclass(frozen=True, repr=False, slots=True)
class TiedLeaf(_Placeholder):
    """Marks a leaf of a packed pytree that reads another leaf's buffer.

    Equal (and of equal hash) when all but the record are equal.

    **Attributes:**

    - `group`: static, the tie group's name.
    - `source`: static, the path of the canonical leaf (the view's source leaf for views).
    - `shape`, `dtype`, `weak_type`: static, the type this leaf has when unpacked.
    - `layout`: static, the layout it was packed under (group kind, members, canonical, view).
    - `record`: the group's layout record on the group's first placeholder, `None` on the others:
      a zero-size float32 array whose shape fingerprints the layout the arrays were packed under
      (its pytree key is `layout_<fingerprint>`).
    """

    group: str = _static()
    source: str = _static()
    shape: tuple[int, ...] = _static()
    dtype: np.dtype = _static()
    weak_type: bool = _static()
    layout: Layout | None = _static(default=None, repr=False)
    record: Any = dataclasses.field(default=None, compare=False, repr=False)
    _aux: Any = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "weak_type", bool(self.weak_type))

    @property
    def fingerprint(self) -> str | None:
        return None if self.layout is None else fingerprint(self.layout)

    def __repr__(self) -> str:
        kind = format_type(self.shape, self.dtype, self.weak_type)
        fn = self.layout[4] if self.layout is not None and self.layout[0] == "view" else None
        reads = self.source if fn is None else f"{fn}({self.source})"
        return f"TiedLeaf({kind}, group={self.group!r}, reads {reads})"


@_register
@dataclasses.dataclass(frozen=True, eq=False, repr=False, slots=True)
class StackedLeaf(_Placeholder):
    """A stacked array of shape `(L, ...)` some of whose slices are tied.

    Compared by identity, as arrays are: its `data` is one (compare two with `eqx.tree_equal`).

    **Attributes:**

    - `data`: the distinct slices, shape `(R, ...)` with `R <= L`.
    - `rows`: static, length `L`: slice `i` of the full array is `data[rows[i]]`.
    - `groups`: static, the names of the tie groups on this array.
    - `weak_type`: static, whether the full array is weakly typed.
    - `layout`: static, the layout it was packed under (each group's slices and kept slice).
    - `record`: its layout record, as for [`tietransform.TiedLeaf`][].
    - `lora_b`, `lora_a`: for relaxed groups (`tt.relaxed`), the factors of shape `(T, m, r)`
      and `(T, r, n)`, one row per relaxed slice; `None` otherwise.
    - `factor_rows`: static, length `L`: slice `i` reads
      `data[rows[i]] + lora_b[f] @ lora_a[f]` with `f = factor_rows[i]`, or has no delta where
      `f == -1`; `None` when no group on the array is relaxed.
    """

    data: Any
    rows: tuple[int, ...] = _static()
    groups: tuple[str, ...] = _static()
    weak_type: bool = _static()
    layout: Layout | None = _static(default=None, repr=False)
    record: Any = dataclasses.field(default=None, repr=False)
    lora_b: Any = dataclasses.field(default=None, repr=False)
    lora_a: Any = dataclasses.field(default=None, repr=False)
    factor_rows: tuple[int, ...] | None = _static(default=None, repr=False)
    _aux: Any = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "weak_type", bool(self.weak_type))
        if self.factor_rows is not None:
            object.__setattr__(self, "factor_rows", tuple(int(r) for r in self.factor_rows))

    @property
    def fingerprint(self) -> str | None:
        return None if self.layout is None else fingerprint(self.layout)

    def __repr__(self) -> str:
        data = self.data
        if hasattr(data, "shape") and hasattr(data, "dtype"):
            full = format_type((len(self.rows), *data.shape[1:]), data.dtype, self.weak_type)
            shape = getattr(self.lora_b, "shape", None)
            relaxed = (
                ""
                if self.factor_rows is None
                else ", relaxed" + (f" rank {shape[-1]}" if shape else "")
            )
            return (
                f"StackedLeaf({full}, groups={self.groups}, rows {list(self.rows)} of "
                f"data {format_type(data.shape, data.dtype)}{relaxed})"
            )
        return f"StackedLeaf(groups={self.groups}, rows {list(self.rows)}, data={data!r})"


@_register
@dataclasses.dataclass(frozen=True, eq=False, repr=False, slots=True)
class RelaxedLeaf(_Placeholder):
    """A member of a relaxed tie group (`tt.relaxed`): it reads `W + lora_b @ lora_a`.

    Compared by identity, as arrays are.

    **Attributes:**

    - `shared`: the group's buffer `W`, shape `(m, n)`, on the canonical member; `None` on the
      others.
    - `lora_b`, `lora_a`: this member's factors, shapes `(m, r)` and `(r, n)`.
    - `group`: static, the tie group's name.
    - `source`: static, the path of the canonical member (where `W` lives).
    - `shape`, `dtype`, `weak_type`: static, the type this leaf has when unpacked.
    - `layout`: static, the layout it was packed under.
    - `record`: the group's layout record on the group's first placeholder, else `None`.
    """

    shared: Any
    lora_b: Any
    lora_a: Any
    group: str = _static()
    source: str = _static()
    shape: tuple[int, ...] = _static()
    dtype: np.dtype = _static()
    weak_type: bool = _static()
    layout: Layout | None = _static(default=None, repr=False)
    record: Any = dataclasses.field(default=None, repr=False)
    _aux: Any = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "weak_type", bool(self.weak_type))

    @property
    def fingerprint(self) -> str | None:
        return None if self.layout is None else fingerprint(self.layout)

    def __repr__(self) -> str:
        kind = format_type(self.shape, self.dtype, self.weak_type)
        shape = getattr(self.lora_b, "shape", None)
        delta = f"rank-{shape[-1]} delta" if shape else "low-rank delta"
        holds = "holds W" if self.shared is not None else f"reads W at {self.source}"
        return f"RelaxedLeaf({kind}, group={self.group!r}, {holds}, + {delta})"


def is_restored_placeholder(x: Any) -> bool:
    """Whether `x` is what a checkpointer restoring *without a target* makes of a placeholder:
    a plain dict holding its layout record under its key `layout_<fingerprint>` (and `data`, or
    a relaxed member's `shared`, `lora_b`, `lora_a`)."""
    if type(x) is not dict or not x or len(x) > 4:
        return False
    records = [k for k in x if isinstance(k, str) and RECORD_KEY.match(k)]
    return len(records) == 1 and all(k in _RESTORED_KEYS or k in records for k in x)


_RESTORED_KEYS = frozenset({"data", "shared", "lora_b", "lora_a"})


def is_placeholder(x: Any) -> bool:
    """Whether `x` stands in for a leaf of the full pytree: a `TiedLeaf` or `StackedLeaf`, or the
    dict a target-less restore made of one (so that `unpack` and `tie` can refuse it clearly)."""
    return isinstance(x, TiedLeaf | StackedLeaf | RelaxedLeaf) or is_restored_placeholder(x)


def describe_record(x: Any) -> str:
    """What a placeholder's static layout says, for messages."""
    return format_layout(getattr(x, "layout", None))

"""Formatting of leaves for messages, and the warnings tietransform emits."""

from typing import Any

import equinox as eqx
import jax
import numpy as np

# Equinox's test for array leaves (a `jax.Array`, tracer, NumPy array or scalar): the one
# `is_array`. Re-exported only for modules that still import it from here (`_tie`, `_resolve`,
# `_describe`); new code calls `eqx.is_array`.
from equinox import is_array as is_array


_SHORT_DTYPES = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint64": "u64",
    "uint32": "u32",
    "uint16": "u16",
    "uint8": "u8",
    "bool": "bool",
    "complex64": "c64",
    "complex128": "c128",
}


class UnreadMemberWarning(UserWarning):
    """A declared member of a tie group is never read by the tied function."""


class StackMaterialisedWarning(UserWarning):
    """A stacked tie had to be materialised as an `L`-fold copy (correct, but costs memory)."""


def short_dtype(dtype: Any) -> str:
    """`f32`, `bf16`, ... for a dtype."""
    name = np.dtype(dtype).name
    return _SHORT_DTYPES.get(name, name)


def format_type(shape: tuple[int, ...], dtype: Any, weak_type: bool = False) -> str:
    """`f32[256,64]`, with `(weak)` for weakly typed arrays."""
    text = f"{short_dtype(dtype)}[{','.join(str(d) for d in shape)}]"
    return text + " (weak)" if weak_type else text


def leaf_type(x: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """`(shape, dtype, weak_type)` of an array leaf."""
    aval = jax.typeof(x) if isinstance(x, jax.Array) else None
    if aval is not None:
        return tuple(aval.shape), np.dtype(aval.dtype), bool(getattr(aval, "weak_type", False))
    array = np.asarray(x)
    # The dtype JAX gives it (float64 NumPy arrays are float32 arrays unless x64 is enabled).
    return tuple(array.shape), np.dtype(jax.dtypes.canonicalize_dtype(array.dtype)), False


def describe_leaf(x: Any) -> str:
    """A short description of any leaf: its type (`f32[4,3]`) for arrays and shape structs, its
    Python type and repr otherwise."""
    if eqx.is_array(x):
        return format_type(*leaf_type(x))
    if isinstance(x, jax.ShapeDtypeStruct):  # e.g. a leaf of an `eqx.filter_eval_shape` skeleton
        return f"ShapeDtypeStruct {format_type(x.shape, x.dtype, bool(x.weak_type))}"
    return f"{type(x).__name__} {x!r}"[:60]

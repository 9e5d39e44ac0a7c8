"""Formatting of leaves for messages, and the warnings tietransform emits (`warn_once`)."""

import os
import sys
import warnings
from typing import Any

import equinox as eqx
import jax
import numpy as np


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


_warned: set[tuple[type[Warning], str]] = set()


def warn_once(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warns with `message` the first time this process sees it, pointing at the user's code.

    For warnings about a configuration rather than a call (a kernel that cannot serve a shape,
    an FFN left to XLA): tracing repeats them on every call otherwise.
    """
    if (category, message) in _warned:
        return
    _warned.add((category, message))
    warnings.warn(message, category, stacklevel=_user_stacklevel())


def reset_warnings() -> None:
    """Forget which warnings `warn_once` has shown (for tests)."""
    _warned.clear()


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# tietransform's files (`kernels/` too, which the source tree links in), Equinox's and JAX's.
_INTERNAL_DIRS = tuple(
    {
        os.path.join(directory, "")
        for directory in (
            _PACKAGE,
            os.path.realpath(_PACKAGE),
            os.path.realpath(os.path.join(_PACKAGE, "kernels")),
            os.path.dirname(os.path.abspath(eqx.__file__ or "")),
            os.path.dirname(os.path.abspath(jax.__file__ or "")),
        )
    }
)


def _user_stacklevel() -> int:
    """The `stacklevel` that points `warn_once`'s warning at the user's code: the first frame
    outside tietransform, Equinox and JAX (tracing nests them to varying depths)."""
    frame, level = sys._getframe(2), 2  # 1 is `warn_once`, which calls `warnings.warn`
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level

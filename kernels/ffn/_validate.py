"""Input checks with errors that name the offending argument, its shape and its dtype."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


__all__ = ["SUPPORTED_DTYPES", "check_ffn_args"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# Short dtype names, as tietransform's messages print types (`f32[256,64]`); kernels import
# nothing of tietransform, so the table is repeated here.
_SHORT_DTYPES = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_SHORT_DTYPES |= {f"{k}{n}": f"{k[0]}{n}" for k in ("int", "uint") for n in (8, 16, 32, 64)}
_SHORT_DTYPES |= {"complex64": "c64", "complex128": "c128"}


def format_type(shape: Sequence[int], dtype: object) -> str:
    """`f32[256,64]`: an array's dtype and shape, as in tietransform's messages."""
    name = jnp.dtype(dtype).name  # type: ignore[arg-type]
    return f"{_SHORT_DTYPES.get(name, name)}[{','.join(str(d) for d in shape)}]"


def _describe(name: str, a: object) -> str:
    if a is None:
        return f"  {name}: None"
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        return f"  {name}: {type(a).__name__} (not an array)"
    return f"  {name}: {format_type(shape, dtype)}"


def _fail(problem: str, args: Sequence[tuple[str, object]], fix: str) -> ValueError:
    listing = "\n".join(_describe(n, a) for n, a in args)
    return ValueError(f"{problem} Got:\n{listing}\n{fix}")


def check_ffn_args(
    fn_name: str,
    x: object,
    weights: Sequence[tuple[str, object]],
    biases: Sequence[tuple[str, object]],
    w_out_name: str,
    w_out: object,
    b_out_name: str,
    b_out: object,
) -> None:
    """Check shapes and dtypes of an FFN call; raise `ValueError`/`TypeError` naming the culprit.

    Expected: `x` `(..., d)`, every input weight `(d, hidden)`, every input bias `(hidden,)` or
    `None`, `w_out` `(hidden, d_out)`, `b_out` `(d_out,)` or `None`; all one floating dtype
    among float32, bfloat16, float16.
    """
    named = [("x", x), *weights, *biases, (w_out_name, w_out), (b_out_name, b_out)]
    for name, a in named:
        if a is None and (name == "x" or name == w_out_name or name in dict(weights)):
            raise _fail(f"{fn_name}: `{name}` is required.", named, f"Pass an array as `{name}`.")
        if a is not None and not isinstance(a, jax.Array | jax.ShapeDtypeStruct):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(
                    f"{fn_name}: `{name}` must be a JAX array, got {type(a).__name__}.\n"
                    f"Convert it with `jnp.asarray({name})`."
                )
    present = [(n, a) for n, a in named if a is not None]
    dtypes = {jnp.dtype(a.dtype) for _, a in present}  # type: ignore[attr-defined]
    if len(dtypes) != 1:
        raise _fail(
            f"{fn_name}: all arguments must have the same dtype.",
            named,
            "Cast them to one dtype (e.g. inside the scan body, so weight gradients still "
            "accumulate in float32 outside it).",
        )
    (dtype,) = dtypes
    if dtype not in SUPPORTED_DTYPES:
        raise _fail(
            f"{fn_name}: dtype {dtype.name} is not supported (float32, bfloat16, float16).",
            named,
            "Cast the arguments to a supported floating dtype.",
        )
    if x.ndim < 1:  # type: ignore[attr-defined]
        raise _fail(f"{fn_name}: `x` must have shape (..., d).", named, "Add a feature axis.")
    d = x.shape[-1]  # type: ignore[attr-defined]
    w0_name, w0 = weights[0]
    if w0.ndim != 2 or w0.shape[0] != d:  # type: ignore[attr-defined]
        raise _fail(
            f"{fn_name}: `{w0_name}` must have shape (d, hidden) with d = x.shape[-1] = {d}.",
            named,
            f"Pass `{w0_name}` as a (d, hidden) matrix (transpose it if it is (hidden, d)).",
        )
    hidden = w0.shape[1]  # type: ignore[attr-defined]
    for name, w in weights[1:]:
        if w.shape != w0.shape:  # type: ignore[attr-defined]
            raise _fail(
                f"{fn_name}: `{name}` must have the shape of `{w0_name}`, ({d}, {hidden}).",
                named,
                "Every input projection maps d -> hidden.",
            )
    for name, b in biases:
        if b is not None and b.shape != (hidden,):  # type: ignore[attr-defined]
            raise _fail(
                f"{fn_name}: `{name}` must have shape (hidden,) = ({hidden},).",
                named,
                f"Pass a vector of length {hidden}, or None for no bias.",
            )
    if w_out.ndim != 2 or w_out.shape[0] != hidden:  # type: ignore[attr-defined]
        raise _fail(
            f"{fn_name}: `{w_out_name}` must have shape (hidden, d_out) with hidden = {hidden}.",
            named,
            f"Pass `{w_out_name}` as a (hidden, d_out) matrix.",
        )
    d_out = w_out.shape[1]  # type: ignore[attr-defined]
    if b_out is not None and b_out.shape != (d_out,):  # type: ignore[attr-defined]
        raise _fail(
            f"{fn_name}: `{b_out_name}` must have shape (d_out,) = ({d_out},).",
            named,
            f"Pass a vector of length {d_out}, or None for no bias.",
        )
    if any(s == 0 for _, a in present for s in a.shape):  # type: ignore[attr-defined]
        raise _fail(
            f"{fn_name}: zero-sized dimensions are not supported.",
            named,
            "Skip the call for empty inputs.",
        )

"""Relaxed ties: each member reads `W + B @ A`, the shared weight plus its own low-rank delta.

- `init_factors`: the factors `pack` stores, from the residuals `W_l - W` (truncated SVD) or at
  zero.
- `LowRankRead`: a relaxed member inside the rewrite, kept lazy, so that a matmul reading it is
  computed as `x @ W + (x @ B) @ A` (`low_rank_dot`) and `W + B @ A` is never built; any other
  use builds it for that use only (`materialise`).
- `stacked_deltas`: the `L`-fold `W + B @ A` of a relaxed stack, for `unpack` and for the uses
  the rewrite does not keep lazy.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._spec import Relaxed


def is_relaxable(shape: tuple[int, ...], dtype: Any, stacked: bool) -> bool:
    """Whether a leaf of this type gets a low-rank delta: a floating matrix (per slice, for a
    stacked leaf). Other leaves (biases, norm scales, integer tables) follow `others`."""
    return len(shape) == (3 if stacked else 2) and bool(jnp.issubdtype(dtype, jnp.floating))


def check_rank(relax: Relaxed, group: str, path: str, shape: tuple[int, ...]) -> None:
    """Raises unless `relax.rank` fits the matrix `shape[-2:]` of the leaf at `path`."""
    m, n = shape[-2:]
    if relax.rank > min(m, n):
        raise ValueError(
            f"Relaxed tie group {group!r}: rank {relax.rank} is larger than the matrix {path} "
            f"({m}x{n}) allows (at most {min(m, n)}, which already reproduces any member "
            "exactly). Lower the rank."
        )


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The dtype to accumulate `dtype` values in: float32 for narrower floats (bfloat16,
    float16), `dtype` itself otherwise.

    Spelled out rather than `jnp.promote_types(dtype, jnp.float32)`, which strict dtype promotion
    (`jax.numpy_dtype_promotion("strict")`) refuses for bfloat16 and float16."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def init_factors(
    residual: jax.Array, relax: Relaxed, salt: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """`(B, A)` for residuals `(..., m, n)`: see `_init_factors`. One compiled program per shape
    and option (a dozen eager operations otherwise, each compiled on its own)."""
    return _init_factors(residual, jnp.asarray(salt, jnp.uint32), relax, np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _init_factors(
    residual: jax.Array, salt: jax.Array, relax: Relaxed, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """`(B, A)` of shapes `(..., m, r)` and `(..., r, n)` for residuals `(..., m, n)`.

    `"svd"`: `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`, so `B @ A` is the best rank-`r`
    approximation of the residual (exact at full rank). `"zeros"`: `B @ A = 0`. A direction whose
    singular value is zero (all of them under `"zeros"`; every one of a member equal to `W`) gets
    `B = 0` and a random row of `A` with standard deviation `1/sqrt(n)`, seeded by `relax.seed`
    and `salt`: the delta is unchanged and every factor receives a gradient (with both zero,
    neither would).
    """
    rank = relax.rank
    m, n = residual.shape[-2:]
    accumulate = accumulation_dtype(residual.dtype)
    u, s, vt = jnp.linalg.svd(residual.astype(accumulate), full_matrices=False)
    u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    tolerance = jnp.max(s, axis=-1, keepdims=True) * jnp.finfo(accumulate).eps * max(m, n)
    live = s > tolerance if relax.init == "svd" else jnp.zeros_like(s, bool)
    root = jnp.where(live, jnp.sqrt(s), 0.0)
    b = u * root[..., None, :]
    key = jax.random.fold_in(jax.random.key(relax.seed), salt)
    noise = jax.random.normal(key, vt.shape, accumulate) / np.sqrt(n)
    a = jnp.where(live[..., :, None], root[..., :, None] * vt, noise)
    return b.astype(dtype), a.astype(dtype)


def delta(b: jax.Array, a: jax.Array, dtype: Any) -> jax.Array:
    """`B @ A` in `dtype`, accumulated in at least float32."""
    accumulate = accumulation_dtype(dtype)
    return jnp.matmul(b, a, preferred_element_type=accumulate).astype(dtype)


def stacked_deltas(
    data: jax.Array, rows: Sequence[int], b: jax.Array, a: jax.Array, factor_rows: Sequence[int]
) -> jax.Array:
    """The full relaxed stack: slice `i` is `data[rows[i]] + B[f] @ A[f]`, `f = factor_rows[i]`
    (no delta where `f == -1`)."""
    full = jnp.take(data, np.asarray(rows, np.int32), axis=0)
    index = np.asarray(factor_rows)
    where = np.flatnonzero(index >= 0)
    if not where.size:
        return full
    chosen = jnp.asarray(index[where], np.int32)
    deltas = delta(jnp.take(b, chosen, axis=0), jnp.take(a, chosen, axis=0), full.dtype)
    return full.at[jnp.asarray(where, np.int32)].add(deltas)


class LowRankRead:
    """A lazy relaxed member `w + scale * (b @ a)` (`scale`: `None`, or a traced 0/1 scalar that
    switches the delta off for a stacked slice without one). Never escapes the interpreter."""

    __slots__ = ("w", "b", "a", "scale", "groups", "weak_type")

    def __init__(
        self,
        w: Any,
        b: Any,
        a: Any,
        scale: Any = None,
        groups: tuple[str, ...] = (),
        weak_type: bool = False,
    ):
        self.w, self.b, self.a, self.scale = w, b, a, scale
        self.groups, self.weak_type = groups, weak_type

    def shape_dtype(self) -> jax.ShapeDtypeStruct:
        """The member's type, for tracing."""
        aval = jax.typeof(self.w)
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=self.weak_type)

    def arrays(self) -> list[Any]:
        return [self.w, self.b, self.a, *([] if self.scale is None else [self.scale])]

    def with_arrays(self, arrays: Sequence[Any]) -> "LowRankRead":
        w, b, a, *scale = arrays
        return self._new(w, b, a, scale[0] if scale else None)

    def _new(self, w: Any, b: Any, a: Any, scale: Any) -> "LowRankRead":
        return LowRankRead(w, b, a, scale, self.groups, self.weak_type)

    def map(self, fn: Callable[[Any], Any]) -> "LowRankRead":
        """`fn` (a cast) applied to `W`, `B` and `A` each, as a hand-written LoRA casts them."""
        return self._new(fn(self.w), fn(self.b), fn(self.a), self.scale)

    def transpose(self) -> "LowRankRead":
        """`(W + B A)^T = W^T + A^T B^T`."""
        return self._new(self.w.T, self.a.T, self.b.T, self.scale)

    def materialise(self) -> Any:
        d = delta(self.b, self.a, self.w.dtype)
        if self.scale is not None:
            d = d * self.scale.astype(d.dtype)
        return self.w + d


def low_rank_dot(eqn: Any, invals: Sequence[Any], bind: Callable[..., Any]) -> Any | None:
    """`dot_general` with one relaxed operand `W + B A`, as `x W + (x B) A` (or `W x + B (A x)`)
    in the equation's layout; `None` where it does not apply (batch dimensions on the matrix,
    both operands relaxed), which the caller materialises.

    `bind(eqn, values)` binds the equation itself (the dense `x W` term, with the traced
    precision and output type)."""
    lhs, rhs = invals
    lazy = [isinstance(v, LowRankRead) for v in invals]
    if lazy == [True, True]:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    side = lazy.index(True)
    read: LowRankRead = invals[side]
    contract = (lc, rc)[side]
    if (lb or rb) or len(contract) != 1 or jnp.ndim(read.w) != 2:
        return None
    (axis,) = contract
    dense = bind(eqn, [read.w if i == side else v for i, v in enumerate(invals)])
    options = dict(
        precision=eqn.params.get("precision"),
        preferred_element_type=eqn.params.get("preferred_element_type"),
    )

    def dot(x: Any, y: Any, cx: Sequence[int], cy: Sequence[int]) -> Any:
        return lax.dot_general(x, y, ((tuple(cx), tuple(cy)), ((), ())), **options)

    # W = B @ A: W's axis 0 is B's axis 0, W's axis 1 is A's axis 1.
    if side == 1:  # x . W: contract x with W's `axis`, the other factor maps r to W's free axis
        x = lhs
        if axis == 0:
            low = dot(dot(x, read.b, lc, (0,)), read.a, (jnp.ndim(x) - 1,), (0,))
        else:
            low = dot(dot(x, read.a, lc, (1,)), read.b, (jnp.ndim(x) - 1,), (1,))
    else:  # W . x: W's free axis leads
        x = rhs
        if axis == 1:
            low = dot(read.b, dot(read.a, x, (1,), rc), (1,), (0,))
        else:
            low = dot(read.a, dot(read.b, x, (0,), rc), (0,), (0,))
    if read.scale is not None:
        low = low * read.scale.astype(low.dtype)
    return dense + low.astype(dense.dtype)

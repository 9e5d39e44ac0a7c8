"""`check_tied`: a tied function's values and gradients against the untied reference.

The reference semantics: `tie(fn, spec)(pack(m))` equals `fn(unpack(pack(m)))`, and the gradient
with respect to each packed buffer equals the sum, over the members reading it, of the gradients
the untied `fn` gives those members at the materialised model `unpack(pack(m))` (pulled back
through each view; summed over tied slices for stacks). The sums here are computed independently
of `tie`: explicitly, in float64 NumPy, from the untied function's gradients.

A relaxed member `W + B @ A` (`tt.relaxed`) with untied gradient `G` pulls back to `G` for `W`
(summed over the members), `G @ A.T` for `B` and `B.T @ G` for `A`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import describe_leaf, format_type, leaf_type
from .._layout import packed_layout
from .._pack import pack, unpack
from .._placeholders import RelaxedLeaf, StackedLeaf, TiedLeaf
from .._resolve import flatten, plan_for
from .._spec import TieSpec
from .._tie import tie


class TieCheckError(AssertionError):
    """A tied function disagrees with its untied reference; the message lists each leaf."""


def tolerance(dtype: Any, summands: int = 1) -> float:
    """Normwise relative tolerance for a result computed in `dtype` as a sum of `summands` terms.

    Each rounded addition in `dtype` adds at most `eps/2` relative to the summands' scale, and
    the terms themselves may round differently once each: `2 * (summands + 1) * eps` bounds both
    with a factor of two to spare. float32: 2.4e-7 per term; bfloat16: 1.6e-2 per term.
    """
    eps = float(jnp.finfo(dtype).eps)
    return 2.0 * (max(int(summands), 1) + 1) * eps


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _normwise_error(got: Any, expected: np.ndarray, scale: float) -> float:
    diff = np.abs(_f64(got) - expected)
    finite = np.isfinite(expected)
    if not np.array_equal(np.isfinite(_f64(got)), finite):
        return float("inf")
    if not diff[finite].size:
        return 0.0
    return float(np.max(diff[finite]) / max(scale, np.finfo(np.float64).tiny))


def tree_allclose(got: Any, expected: Any, *, summands: int = 1) -> list[str]:
    """Compares two pytrees of arrays leaf by leaf, normwise, with `tolerance(dtype, summands)`.

    **Returns:** a list of human-readable mismatches (empty when everything matches).
    """
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    expected_leaves = jax.tree_util.tree_leaves(expected)
    if len(got_leaves) != len(expected_leaves):
        return [
            f"different structures: {jax.tree.structure(got)} vs {jax.tree.structure(expected)}"
        ]
    problems = []
    for (path, a), b in zip(got_leaves, expected_leaves, strict=True):
        if not eqx.is_array(a):
            continue
        if np.shape(a) != np.shape(b):
            got_type, want_type = describe_leaf(a), describe_leaf(np.asarray(b))
            problems.append(f"{jax.tree_util.keystr(path)}: {got_type} vs {want_type}")
            continue
        e = _f64(b)
        finite = e[np.isfinite(e)]
        err = _normwise_error(a, e, float(np.max(np.abs(finite))) if finite.size else 1.0)
        dtype = np.asarray(a).dtype  # bfloat16's NumPy kind is "V": ask JAX what is a float
        tol = tolerance(dtype if jnp.issubdtype(dtype, jnp.floating) else np.float32, summands)
        if not err <= tol:
            problems.append(f"{jax.tree_util.keystr(path)}: error {err:.3g} > tolerance {tol:.3g}")
    return problems


def expected_packed_grads(packed: Any, spec: TieSpec, full_grads: Any) -> tuple[Any, Any, Any]:
    """The gradient each packed buffer should receive, from the untied gradients `full_grads`.

    **Arguments:**

    - `packed`: the packed params (from [`tietransform.pack`][]).
    - `spec`: its spec.
    - `full_grads`: gradients of the untied function at `unpack(packed, spec)`, a pytree of the
      full model's structure (non-array leaves are ignored).

    **Returns:**

    `(expected, scale, terms)`: three pytrees shaped like `packed` whose array leaves are the
    expected gradients (float64 NumPy), the sum of the summands' magnitudes (for normwise errors)
    and the number of summands.
    """
    flat = flatten(packed)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    layout = packed_layout(plan, leaves)
    _, grads, _ = flatten(full_grads)
    expected: list[Any] = list(leaves)
    scale: list[Any] = list(leaves)
    terms: list[Any] = list(leaves)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, StackedLeaf):
            g = _f64(grads[i])
            rows = np.asarray(leaf.rows)
            summed = np.stack([g[rows == k].sum(axis=0) for k in range(np.shape(leaf.data)[0])])
            slice_scale = np.abs(g).reshape(len(rows), -1).max(axis=1, initial=0.0)
            group_scale = max(float(slice_scale[rows == k].sum()) for k in range(len(summed)))
            factors = _stacked_factor_grads(leaf, g)
            expected[i] = dataclasses.replace(leaf, data=summed, **factors[0])
            scale[i] = dataclasses.replace(leaf, data=group_scale, **factors[1])
            terms[i] = dataclasses.replace(leaf, data=int(np.bincount(rows).max()), **factors[2])
        elif isinstance(leaf, RelaxedLeaf):
            g = _f64(grads[i])
            (b, a), (b_scale, a_scale), counts = _factor_grads(leaf.lora_b, leaf.lora_a, g)
            shared = None if leaf.shared is None else np.zeros(np.shape(leaf.shared))
            expected[i] = dataclasses.replace(leaf, shared=shared, lora_b=b, lora_a=a)
            scale[i] = dataclasses.replace(
                leaf, shared=None if shared is None else 0.0, lora_b=b_scale, lora_a=a_scale
            )
            terms[i] = dataclasses.replace(
                leaf, shared=None if shared is None else 0, lora_b=counts[0], lora_a=counts[1]
            )
        elif eqx.is_array(leaf):
            expected[i] = _f64(grads[i])
            scale[i] = float(np.max(np.abs(expected[i]), initial=0.0))
            terms[i] = 1
    for slot in layout.relaxed:  # W: the sum of the members' untied gradients
        c = slot.canonical
        members = (c, *slot.readers)
        total = sum(_f64(grads[m]) for m in members)
        magnitude = sum(float(np.max(np.abs(_f64(grads[m])), initial=0.0)) for m in members)
        expected[c] = dataclasses.replace(expected[c], shared=total)
        scale[c] = dataclasses.replace(scale[c], shared=magnitude)
        terms[c] = dataclasses.replace(terms[c], shared=len(members))
    for slot in layout.slots:
        c = slot.canonical
        for reader in slot.readers:
            g = grads[reader]
            if slot.fn is not None:
                _, pullback = jax.vjp(slot.fn, leaves[c])
                (g,) = pullback(jnp.asarray(g))
            expected[c] = expected[c] + _f64(g)
            scale[c] += float(np.max(np.abs(_f64(g)), initial=0.0))
            terms[c] += 1
    return tuple(jax.tree_util.tree_unflatten(treedef, x) for x in (expected, scale, terms))


def _compute_eps(fn: Callable[..., Any], full: Any, args: Any, kwargs: Any) -> float:
    """The largest machine epsilon among the matmul operands of the untied `fn`: the precision
    the relaxed reads' sums are computed in (bfloat16 under a mixed-precision cast)."""
    try:
        closed = eqx.filter_make_jaxpr(fn)(full, *args, **kwargs)[0]
    except Exception:
        return float(jnp.finfo(jnp.float32).eps)
    found = [float(jnp.finfo(jnp.float32).eps)]

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive is jax.lax.dot_general_p:
                found.extend(
                    float(jnp.finfo(v.aval.dtype).eps)
                    for v in eqn.invars
                    if jnp.issubdtype(v.aval.dtype, jnp.floating)
                )
            for value in eqn.params.values():
                for item in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed.jaxpr)
    return max(found)


def _reassociated_terms(packed: Any, spec: TieSpec) -> Callable[[Any], int]:
    """The summands by which relaxed reads may round differently from the reference.

    A relaxed read feeding a matmul is computed as `x @ W + (x @ B) @ A`, the reference as
    `x @ (W + B @ A)`: the same sums associated differently, so each read's result may round as
    a sum of up to `m + n + r` more terms, and its error reaches everything computed after it
    (the gradients of untied leaves too). To first order the errors of successive reads add: the
    sum of `m + n + r` over every relaxed member (each relaxed slice of a stack). Returns, for a
    result's dtype, that allowance in summands of its epsilon (0 when nothing is relaxed).

    The sums are taken to round in the result's dtype. Where the matmuls run in a lower
    precision (a bfloat16 cast inside `fn`), the same bound in bfloat16 would exceed 1 relative
    and so could not catch a dropped gradient: it is not widened, and `check_tied` says instead
    that such differences are expected (check relaxed ties with float32 compute)."""
    del spec
    total = 0
    for leaf in flatten(packed).leaves:
        if isinstance(leaf, RelaxedLeaf | StackedLeaf) and leaf.lora_b is not None:
            b_shape, a_shape = np.shape(leaf.lora_b), np.shape(leaf.lora_a)
            reads = b_shape[0] if isinstance(leaf, StackedLeaf) else 1
            total += reads * (b_shape[-2] + b_shape[-1] + a_shape[-1])

    def extra(dtype: Any) -> int:
        del dtype
        return total

    return extra


def _factor_grads(b: Any, a: Any, g: np.ndarray) -> tuple[Any, Any, Any]:
    """`(G @ A.T, B.T @ G)`, their summands' magnitudes, and their summand counts."""
    b, a = _f64(b), _f64(a)
    grads = (g @ np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2) @ g)
    scales = (
        float(np.max(np.abs(g) @ np.abs(np.swapaxes(a, -1, -2)), initial=0.0)),
        float(np.max(np.abs(np.swapaxes(b, -1, -2)) @ np.abs(g), initial=0.0)),
    )
    return grads, scales, (g.shape[-1] + 1, g.shape[-2] + 1)


def _stacked_factor_grads(leaf: StackedLeaf, g: np.ndarray) -> tuple[dict, dict, dict]:
    """The expected factor gradients of a relaxed stack (empty dicts for a strict one)."""
    if leaf.factor_rows is None:
        return {}, {}, {}
    index = np.asarray(leaf.factor_rows)
    b_grad, a_grad = np.zeros(np.shape(leaf.lora_b)), np.zeros(np.shape(leaf.lora_a))
    slices = np.flatnonzero(index >= 0)
    grads, scales, counts = _factor_grads(
        np.asarray(leaf.lora_b)[index[slices]], np.asarray(leaf.lora_a)[index[slices]], g[slices]
    )
    np.add.at(b_grad, index[slices], grads[0])
    np.add.at(a_grad, index[slices], grads[1])
    return (
        {"lora_b": b_grad, "lora_a": a_grad},
        {"lora_b": scales[0], "lora_a": scales[1]},
        {"lora_b": counts[0], "lora_a": counts[1]},
    )


def _random_cotangent(key: jax.Array, out: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(out)
    keys = jax.random.split(key, max(len(leaves), 1))
    cts = []
    for k, leaf in zip(keys, leaves, strict=False):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"check_tied differentiates `fn`, so its outputs must be floating point; got "
                f"{format_type(*leaf_type(leaf))}."
            )
        cts.append(jax.random.normal(k, jnp.shape(leaf), dtype))
    return jax.tree_util.tree_unflatten(treedef, cts)


def _compare_grads(
    packed: Any,
    got: Any,
    expected: Any,
    scale: Any,
    terms: Any,
    paths: Sequence[str],
    extra: Callable[[Any], int] = lambda dtype: 0,
) -> list[str]:
    problems = []
    _, got_leaves, _ = flatten(got)
    _, exp_leaves, _ = flatten(expected)
    _, scale_leaves, _ = flatten(scale)
    _, term_leaves, _ = flatten(terms)
    _, packed_leaves, _ = flatten(packed)
    for path, p, g, e, s, n in zip(
        paths, packed_leaves, got_leaves, exp_leaves, scale_leaves, term_leaves, strict=True
    ):
        if isinstance(p, TiedLeaf) or not (
            eqx.is_array(p) or isinstance(p, StackedLeaf | RelaxedLeaf)
        ):
            continue
        parts = [("", p, g, e, s, n)]
        if isinstance(p, StackedLeaf | RelaxedLeaf):
            names = ["data"] if isinstance(p, StackedLeaf) else ["shared"]
            names += ["lora_b", "lora_a"]
            parts = [
                (f".{k}", *(getattr(x, k) for x in (p, g, e, s, n)))
                for k in names
                if getattr(p, k) is not None
            ]
        for suffix, p, g, e, s, n in parts:
            dtype = np.asarray(p).dtype
            if not jnp.issubdtype(dtype, jnp.floating):
                continue
            err = _normwise_error(g, e, s)
            tol = tolerance(dtype, n + extra(dtype))
            if not err <= tol:
                problems.append(
                    f"  {path}{suffix} ({format_type(*leaf_type(p))}, {n} member(s)): gradient "
                    f"error {err:.3g} > tolerance {tol:.3g}"
                )
    return problems


def check_tied(
    fn: Callable[..., Any],
    spec: TieSpec,
    params: Any,
    *args: Any,
    key: jax.Array | None = None,
    num_cotangents: int = 2,
    **kwargs: Any,
) -> None:
    """Check `tie(fn, spec)` against the untied `fn` on your own model; raise if they disagree.

    **Arguments:**

    - `fn`: the untied function `(params, *args, **kwargs) -> out`; `out` a pytree of floating
      point arrays.
    - `spec`: the [`tietransform.TieSpec`][].
    - `params`: the full model.
    - `*args`, `**kwargs`: the other arguments of `fn`.
    - `key`: PRNG key for the random cotangents (default `jax.random.key(0)`).
    - `num_cotangents`: how many random cotangents to pull back.

    Checks, with tolerances from [`tietransform.testing.tolerance`][] by dtype:

    1. `tie(fn, spec)(pack(params), ...) == fn(unpack(pack(params)), ...)`;
    2. for random cotangents `ct`, the VJP of the tied function with respect to every packed
       buffer equals the sum of the untied VJPs of its members at `unpack(pack(params))`.

    **Raises:**

    [`tietransform.testing.TieCheckError`][] listing every leaf that differs, with its path,
    dtype, error and tolerance.
    """
    key = jax.random.key(0) if key is None else key
    packed = pack(params, spec)
    full = unpack(packed, spec)
    tied = tie(fn, spec)
    packed_arrays, packed_static = eqx.partition(packed, eqx.is_array)
    full_arrays, full_static = eqx.partition(full, eqx.is_array)
    out, tied_vjp = jax.vjp(
        lambda a: tied(eqx.combine(a, packed_static), *args, **kwargs), packed_arrays
    )
    reference, reference_vjp = jax.vjp(
        lambda a: fn(eqx.combine(a, full_static), *args, **kwargs), full_arrays
    )
    compute_eps = _compute_eps(fn, full, args, kwargs)
    extra = _reassociated_terms(packed, spec)
    out_dtype = min(
        (np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(reference)),
        key=lambda d: -float(jnp.finfo(d).eps),
        default=np.dtype(np.float32),
    )
    problems = [
        f"  value {p}" for p in tree_allclose(out, reference, summands=1 + extra(out_dtype))
    ]
    paths = plan_for(spec, flatten(packed)).paths
    for ct_key in jax.random.split(key, num_cotangents):
        ct = _random_cotangent(ct_key, reference)
        (got,) = tied_vjp(ct)
        (full_grads,) = reference_vjp(ct)
        expected, scale, terms = expected_packed_grads(
            packed, spec, eqx.combine(full_grads, full_static)
        )
        problems += _compare_grads(
            packed, eqx.combine(got, packed_static), expected, scale, terms, paths, extra
        )
    if problems:
        hint = ""
        if extra(np.float32) and compute_eps > float(jnp.finfo(jnp.float32).eps):
            hint = (
                f"\nThe matmuls of `fn` run in a precision of eps {compute_eps:.3g} and relaxed "
                "reads are computed as x @ W + (x @ B) @ A, the reference as x @ (W + B @ A): "
                "their rounding differs by that precision, beyond the tolerances here. Check "
                "relaxed ties with float32 compute."
            )
        raise TieCheckError(
            f"tie({getattr(fn, '__name__', 'fn')}, spec) disagrees with the untied function:\n"
            + "\n".join(dict.fromkeys(problems))
            + hint
        )

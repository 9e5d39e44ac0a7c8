"""`unpack_grads`: a gradient (or update) of packed params, shown at every member of the model.

A packed gradient holds one array per buffer: the sum over a group's members of the gradients
they would receive untied. `unpack` is for params: it applies each view's function, offset
included, so a `w + 1` view would turn a gradient `g` into `g + 1`. `unpack_grads` applies the
*tangent map* of `unpack` instead,

    unpack_grads(g, spec, params) == jax.jvp(lambda p: tt.unpack(p, spec), (params,), (g,))[1]

When every view is affine its derivative is the same at every point, and `params` may be left
out. Which outputs depend on the point is read from the traced jaxpr: a sound, syntactic test
(an output counts as dependent if any path of equations leads to it from the params), so a view
it cannot prove affine asks for `params` rather than giving a derivative taken somewhere else.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _compat
from ._pack import unpack
from ._paths import format_path
from ._placeholders import TiedLeaf, is_placeholder
from ._spec import TieSpec


PyTree = TypeVar("PyTree")

# Primitives whose one inner jaxpr is called once with the equation's inputs, in order, and
# returns its outputs: dependencies can be read through them. Any other equation with a tainted
# input taints all its outputs (loops such as scan feed outputs back into inputs).
_CALLS = _compat.CALLS


def unpack_grads(grads: PyTree, spec: TieSpec, params: Any = None) -> PyTree:
    """Show a gradient of packed params at every member of the full model.

    Use it, not [`tietransform.unpack`][], for gradients and optimizer updates: `unpack` is for
    params, and would apply each view's function (offset included) to the gradient.

    **Arguments:**

    - `grads`: a gradient with respect to packed params, such as
      `jax.grad(tt.tie(loss, spec))(packed, x)`, or an optimizer's update. It has the structure
      of the packed params.
    - `spec`: the [`tietransform.TieSpec`][] the params were packed with.
    - `params`: the packed params the gradient was taken at, with the structure of `grads`. Only
      needed when a view's function is not affine; the result does not depend on it otherwise.

    **Returns:**

    The full model's structure, every member showing its group's gradient: the gradient of the
    group's buffer, which is the sum of the gradients the members would receive untied (each
    pulled back through its view).

    - Members of a plain group, and a view's source, show the group's gradient `g`.
    - A view's target shows `J g`, `J` the derivative of the view's function: `g.T` for
      `jnp.transpose`, `g` for `w + 1` (never an offset), `2 * g` for `2 * w`. For a view that is
      not affine, `J` is taken at `params`.
    - Each slice of a stacked array shows the gradient of the stored slice it reads: for tied
      slices, the group's gradient. Untied leaves show their own gradient.

    Exactly: `jax.jvp(lambda p: tt.unpack(p, spec), (params,), (grads,))[1]`, the first-order
    change of each member when the packed params move by `grads`. So for an update `u` and affine
    views, `unpack(params + u) == unpack(params) + unpack_grads(u)`.

    **Raises:**

    `ValueError` naming the member and its view when a view is not affine and `params` is not
    given; when `params` and `grads` differ in structure; and, as `unpack` does, when `grads`
    does not have the structure `pack(..., spec)` gives.
    """
    shown = unpack(grads, spec)  # checks the structure; non-float leaves are shown as they are
    grad_leaves, treedef = jax.tree_util.tree_flatten(grads)
    point_leaves = grad_leaves if params is None else _point_leaves(params, treedef)
    moving = [_is_float(x) for x in grad_leaves]

    def full_floats(moved: Sequence[Any]) -> list[Any]:
        """The full model's leaves at the point moved to `moved`; `None` for non-float leaves."""
        moved_iter = iter(moved)
        leaves = [next(moved_iter) if m else x for x, m in zip(point_leaves, moving, strict=True)]
        full = unpack(jax.tree_util.tree_unflatten(treedef, leaves), spec)
        return [x if _is_float(x) else None for x in jax.tree_util.tree_leaves(full)]

    point = [x for x, m in zip(point_leaves, moving, strict=True) if m]
    tangent = [x for x, m in zip(grad_leaves, moving, strict=True) if m]
    if params is None:
        _refuse_point_dependent(full_floats, tangent, grads, shown)
    _, tangents_out = jax.jvp(full_floats, (point,), (tangent,))
    shown_leaves, shown_treedef = jax.tree_util.tree_flatten(shown)
    out = [s if t is None else t for t, s in zip(tangents_out, shown_leaves, strict=True)]
    return jax.tree_util.tree_unflatten(shown_treedef, out)


def _is_float(x: Any) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _point_leaves(params: Any, treedef: Any) -> list[Any]:
    leaves, params_treedef = jax.tree_util.tree_flatten(params)
    if params_treedef != treedef:
        raise ValueError(
            "tt.unpack_grads: `params` must have the structure of `grads`. Got\n"
            f"  params: {params_treedef}\n  grads:  {treedef}\n"
            "Pass the packed params the gradient was taken at; for a gradient from "
            "`eqx.filter_grad`, pass `eqx.filter(params, eqx.is_inexact_array)`."
        )
    return leaves


def _refuse_point_dependent(
    full_floats: Callable[[Sequence[Any]], list[Any]], tangent: list[Any], grads: Any, shown: Any
) -> None:
    """Raises, naming the first member whose shown gradient would depend on the params."""
    closed, shapes = jax.make_jaxpr(
        lambda p, t: jax.jvp(full_floats, (p,), (t,))[1], return_shape=True
    )(tangent, tangent)
    jaxpr, _ = _compat.split_jaxpr(closed)
    tainted = [True] * len(tangent) + [False] * len(tangent)
    dependent = _depends_on(jaxpr, tainted)
    if not any(dependent):
        return
    positions = [i for i, shape in enumerate(shapes) if shape is not None]  # of the outvars
    keys, _ = jax.tree_util.tree_flatten_with_path(shown)[0][positions[dependent.index(True)]]
    path = format_path(keys)
    placeholders = {
        format_path(k): x
        for k, x in jax.tree_util.tree_flatten_with_path(grads, is_leaf=is_placeholder)[0]
    }
    leaf = placeholders.get(path)
    what = (
        f"the function of view {leaf.group!r} (reading {leaf.source})"
        if isinstance(leaf, TiedLeaf)
        else "the way it is unpacked"
    )
    raise ValueError(
        f"tt.unpack_grads needs the params to show the gradient at {path}: {what} is not affine "
        "(or not provably so), so its derivative depends on the point it is taken at. Pass the "
        "packed params the gradient was taken at: `tt.unpack_grads(grads, spec, params=packed)`."
    )


def _depends_on(jaxpr: Any, tainted: Sequence[bool]) -> list[bool]:
    """For each output of the open `jaxpr`, whether it depends on a `tainted` input."""
    env = {v for v, t in zip(jaxpr.invars, tainted, strict=True) if t}
    for eqn in jaxpr.eqns:
        inputs = [not _compat.is_literal(v) and v in env for v in eqn.invars]
        if not any(inputs):
            continue
        outputs = [True] * len(eqn.outvars)
        inner = _compat.inner_jaxprs(eqn)
        if eqn.primitive in _CALLS and len(inner) == 1:
            body, _ = _compat.split_jaxpr(inner[0])
            if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars):
                outputs = _depends_on(body, inputs)
        env.update(v for v, t in zip(eqn.outvars, outputs, strict=True) if t)
    return [not _compat.is_literal(v) and v in env for v in jaxpr.outvars]

"""`tie`: the public transformation. Trace, rewrite the parameter reads, evaluate."""

import functools
from collections.abc import Callable, Mapping
from typing import Any, overload

import equinox as eqx
import jax

from . import _compat
from ._audit import audit_reads
from ._ffn_routing import Implementation, Routing, routing_for
from ._layout import full_leaves, packed_layout
from ._lowrank import LowRankRead
from ._placeholders import RelaxedLeaf, StackedLeaf, is_placeholder
from ._resolve import flatten, plan_for
from ._rewrite import StackedRead, evaluate
from ._spec import TieSpec


FuseFFN = bool | Implementation | None


@overload
def tie(
    fn: TieSpec,
    spec: None = None,
    /,
    *,
    audit: bool = True,
    fuse_ffn: FuseFFN = None,
    ffn_options: Mapping[str, Any] | None = None,
) -> Callable[[Callable], Callable]: ...
@overload
def tie(
    fn: Callable,
    spec: TieSpec,
    /,
    *,
    audit: bool = True,
    fuse_ffn: FuseFFN = None,
    ffn_options: Mapping[str, Any] | None = None,
) -> Callable: ...
def tie(
    fn: Any,
    spec: TieSpec | None = None,
    /,
    *,
    audit: bool = True,
    fuse_ffn: FuseFFN = None,
    ffn_options: Mapping[str, Any] | None = None,
) -> Any:
    """Make `fn` read one buffer per tie group.

    Use as `tie(fn, spec)` or as a decorator, `@tie(spec)`.

    **Arguments:**

    - `fn`: a function `(params, *args, **kwargs) -> out`, written as if nothing were tied.
      Array leaves of `args`/`kwargs` are traced; other leaves are passed through unchanged.
    - `spec`: a [`tietransform.TieSpec`][] naming the groups.
    - `audit`: check, at trace time, that every declared member is read and that parameters are
      not captured by closure (see below). Costs a pass over the jaxpr, at trace time only.
    - `fuse_ffn`: serve FFNs whose weights are tied (`act(x @ W1 + b1) @ W2 + b2`, in a scan
      body or not; gated FFNs go to `kernels.gated_ffn`) with the fused kernels. `None`
      (default): where a Pallas backend exists (GPU, TPU), the sites the compiled kernel
      supports are served and the rest are left to XLA silently; off on CPU. `True`: on
      everywhere (Pallas interpret mode on CPU), warning once for each site the kernel cannot
      serve. `False`: off. A string is passed to `kernels.ffn` as its `implementation`, and
      warns as `True` does. [`tietransform.ffn_routing_report`][] lists every FFN site found,
      with what served it and why.
    - `ffn_options`: further keyword arguments of `kernels.ffn` for every site it serves
      (`backend`, `config`, `block_m`, `block_h`), e.g. `{"config": kernels.CONFIGS["pipelined"]}`
      to run one tuning config, or `{"backend": "gpu"}` to run the Mosaic GPU kernels in the
      interpreter on CPU.

    **Returns:**

    A function `(packed, *args, **kwargs) -> out` taking the output of [`tietransform.pack`][] in
    place of `params`. Its value is `fn(unpack(packed), *args, **kwargs)`, the same pytree: arrays
    keep their dtype and weak type (a NumPy array comes back as a JAX array, as from
    `eqx.filter_jit`), and other leaves (Python scalars, strings) are returned as they are. The
    gradient with respect to a group's buffer is the sum of the gradients its members receive
    untied (pulled back through each view). It composes with `jax.jit`, `grad`, `vjp`, `jvp`,
    `vmap`, `lax.scan`, `jax.checkpoint` and sharding, and under `jit` it costs nothing: the
    compiled program has one parameter per buffer and is the program a hand-written shared model
    gives.

    `fn` is traced on every call (let `jax.jit` cache compiled calls); nothing is cached across
    calls, so configuration such as `jax.default_matmul_precision` is always honoured.

    A spec with no groups, `TieSpec()`, ties nothing: `tie` returns `fn` itself.

    **Raises / warns:**

    - `ValueError` if `packed` does not have the structure `pack(params, spec)` produces.
    - `ValueError` if `fn` reads parameters captured by closure instead of its `params` argument.
    - [`tietransform.UnreadMemberWarning`][] for a declared member `fn` never reads.

    !!! Example
        ```python
        spec = tt.TieSpec(ffn="blocks[*].mlp")

        @tt.tie(spec)
        def loss(model, x, y):
            return jnp.mean((model(x) - y) ** 2)

        packed = tt.pack(model, spec)
        value, grads = eqx.filter_value_and_grad(loss)(packed, x, y)
        ```
    """
    if isinstance(fn, TieSpec) and spec is None:
        chosen = fn
        return lambda f: tie(f, chosen, audit=audit, fuse_ffn=fuse_ffn, ffn_options=ffn_options)
    if not callable(fn):
        raise TypeError(f"tie: expected a function to tie, got {type(fn).__name__}.")
    if not isinstance(spec, TieSpec):
        raise TypeError(
            "tie needs a TieSpec: use `tie(fn, spec)` or the decorator `@tie(spec)`, got "
            f"{type(spec).__name__}."
        )
    routing = routing_for(fuse_ffn, ffn_options)  # bad options fail here, not at the first call
    if not spec.groups:  # ties nothing (an ablation's "no sharing" arm): fn reads its params
        return fn
    chosen_spec: TieSpec = spec

    @functools.wraps(fn)
    def tied(packed: Any, *args: Any, **kwargs: Any) -> Any:
        return _call(fn, chosen_spec, audit, routing, packed, args, kwargs)

    return tied


def _call(
    fn: Callable,
    spec: TieSpec,
    audit: bool,
    routing: Routing | None,
    packed: Any,
    args: tuple,
    kwargs: dict,
) -> Any:
    flat = flatten(packed)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    if not any(is_placeholder(x) for x in leaves):
        raise ValueError(
            f"`{_name(fn)}` is tied and takes packed params, but it was given a full model (it "
            "holds no TiedLeaf/StackedLeaf). Call `tt.pack(params, spec)` and pass the result."
        )
    layout = packed_layout(plan, leaves)
    full = full_leaves(plan, layout, leaves, stacked=_stacked_read, relaxed=_relaxed_read)
    # A stacked or relaxed read is traced as the full leaf's type; the rewrite reads it lazily.
    model = [x.shape_dtype() if isinstance(x, StackedRead | LowRankRead) else x for x in full]
    closed, out_types, out_static = eqx.filter_make_jaxpr(fn)(
        jax.tree_util.tree_unflatten(treedef, model), *args, **kwargs
    )
    jaxpr, consts = _compat.split_jaxpr(closed)
    # `filter_make_jaxpr` traces exactly these leaves, in this order: the model's, then the args'.
    traced_leaves = [i for i, x in enumerate(model) if _is_traced(x)]
    arg_values = jax.tree_util.tree_leaves(eqx.filter((args, kwargs), _is_traced))
    if audit:
        audit_reads(_name(fn), plan, jaxpr, consts, leaves, traced_leaves)
    tied_leaves = {
        i for slot in (*layout.slots, *layout.relaxed) for i in (slot.canonical, *slot.readers)
    }
    tied_leaves.update(layout.stacks)
    tied = [i in tied_leaves for i in traced_leaves] + [False] * len(arg_values)
    values = [full[i] for i in traced_leaves] + arg_values
    # A constant output (a `Literal`) evaluates to a Python scalar: returned as the array it is.
    outs = [_compat.as_array(x) for x in evaluate(jaxpr, consts, values, tied, routing)]
    dynamic = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_types), outs)
    return eqx.combine(dynamic, out_static)


def _is_traced(x: Any) -> bool:
    """What `eqx.filter_make_jaxpr` traces: arrays and `jax.ShapeDtypeStruct`s."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _stacked_read(leaf: StackedLeaf) -> StackedRead:
    factors = None if leaf.factor_rows is None else (leaf.lora_b, leaf.lora_a, leaf.factor_rows)
    return StackedRead(leaf.data, leaf.rows, leaf.weak_type, leaf.groups, factors=factors)


def _relaxed_read(shared: Any, leaf: RelaxedLeaf) -> LowRankRead:
    return LowRankRead(shared, leaf.lora_b, leaf.lora_a, None, (leaf.group,), leaf.weak_type)


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)

"""The jaxpr pass: evaluate a traced function with its parameter reads rewritten.

Plain ties and views need no rewrite at all: `tie` binds every member's input variable to the
canonical buffer (or to `fn(canonical)` for a view) and the jaxpr is evaluated as traced, which
gives exactly the program a hand-written "pass the MLP as an argument" model gives.

Stacked ties are where a rewrite pays: the full stacked array is `data[rows]`, an `L`-fold copy if
built. Its input variable is bound to a lazy `StackedRead`, and the evaluator (`_interpret`, with
the rules below, keyed on primitive objects and looked up once per equation) rewrites each
equation that reads it. One rule per primitive kind, registered next to its definition:

| primitive            | what happens to a stacked read                                         |
|----------------------|-------------------------------------------------------------------------|
| `scan` (as `xs`)     | scans over `rows` instead, reading `data[row]` in the body: no copy     |
| `jit`, `closed_call` | the inner jaxpr is evaluated inline, so the rules apply inside          |
| `checkpoint`/`remat` | re-emitted as `jax.checkpoint` with the same policy; rules apply inside |
| `cond`, `while`, `shard_map`, `custom_*`, `pallas_call`, ... | materialised, with a warning   |
| elementwise (`convert_element_type`, `mul`, ...) | applied to the kept slices: stays stacked  |
| slice reads (`slice`, `dynamic_slice`, `gather`, `squeeze`) | a gather XLA fuses into the read |
| any other first-order primitive | materialised, with a warning                                |

So the cast of a mixed-precision loss (`w.astype(jnp.bfloat16)` before the scan) casts the kept
slices only and the scan still reads one slice per iteration; a `reshape` or `dot_general` of the
whole stack builds it (and says so).
"""

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as _primitives

from . import _compat, _interpret
from ._errors import StackMaterialisedWarning
from ._ffn_match import FFNSite, find_ffn_sites, tied_through_casts
from ._ffn_routing import RoutedFFN, Routing, decide, left_to_xla, serve
from ._layout import take_rows
from ._lowrank import LowRankRead, low_rank_dot, stacked_deltas


class StackedRead:
    """A lazy stacked array: slice `i` is `ops(data[rows[i]])`. Never escapes the interpreter.

    `ops` are elementwise functions (a mixed-precision cast, a scale) deferred to each slice as
    it is read, so the stack is never built and each slice's cotangent is converted back before
    it is summed into `data`'s (in `data`'s dtype, as the untied model sums its members').

    A relaxed stack (`factors = (B, A, factor_rows)`) reads slice `i` as the lazy
    `LowRankRead(data[rows[i]], B[f], A[f])`, `f = factor_rows[i]` (no delta where `f == -1`);
    its only deferred ops are casts, applied to `W`, `B` and `A` each.
    """

    __slots__ = ("data", "rows", "weak_type", "groups", "ops", "dtype", "factors")

    def __init__(
        self,
        data: Any,
        rows: tuple[int, ...],
        weak_type: bool,
        groups: tuple[str, ...],
        ops: tuple[Callable[[Any], Any], ...] = (),
        dtype: Any = None,
        factors: tuple[Any, Any, tuple[int, ...]] | None = None,
    ):
        self.data = data
        self.rows = rows
        self.weak_type = weak_type
        self.groups = groups
        self.ops = ops
        self.dtype = jax.typeof(data).dtype if dtype is None else dtype
        self.factors = factors

    def shape_dtype(self) -> jax.ShapeDtypeStruct:
        """The type of the full array, for tracing."""
        aval = jax.typeof(self.data)
        shape = (len(self.rows), *aval.shape[1:])
        return jax.ShapeDtypeStruct(shape, self.dtype, weak_type=self.weak_type)

    def arrays(self) -> list[Any]:
        return [self.data, *([] if self.factors is None else self.factors[:2])]

    def with_arrays(self, arrays: Sequence[Any]) -> "StackedRead":
        data, *factors = arrays
        relaxed = None if self.factors is None else (*factors, self.factors[2])
        return StackedRead(
            data, self.rows, self.weak_type, self.groups, self.ops, self.dtype, relaxed
        )

    def with_op(self, op: Callable[[Any], Any], aval: Any) -> "StackedRead":
        """This stack with the elementwise `op` deferred to each slice; `aval`: its output's."""
        ops = (*self.ops, op)
        return StackedRead(
            self.data, self.rows, aval.weak_type, self.groups, ops, aval.dtype, self.factors
        )

    def apply(self, value: Any) -> Any:
        for op in self.ops:
            value = value.map(op) if isinstance(value, LowRankRead) else op(value)
        return value

    def index(self) -> Any:
        """What a scan over the stack scans: `rows` (`(L,)`); for a relaxed stack whose every
        slice has its own factors, the factors themselves too (`(rows, B, A)`); else the rows
        with the factor rows (`(L, 2)`)."""
        if self.factors is None:
            return jnp.asarray(self.rows, jnp.int32)
        b, a, factor_rows = self.factors
        if factor_rows == tuple(range(len(self.rows))):
            return (jnp.asarray(self.rows, jnp.int32), b, a)
        return jnp.asarray(list(zip(self.rows, factor_rows, strict=True)), jnp.int32)

    def read(self, index: Any) -> Any:
        """One slice (`index`: one of `self.index()`, traced), with the deferred ops applied."""
        if self.factors is None:
            return self.apply(_read_slice(self.data, index))
        if isinstance(index, tuple):  # the factors were scanned
            row, b_i, a_i = index
            return self.apply(LowRankRead(_read_slice(self.data, row), b_i, a_i, None, self.groups))
        b, a, factor_rows = self.factors
        row, factor = index[0], index[1]
        clipped = jnp.maximum(factor, 0)
        w = _read_slice(self.data, row)
        scale = None if min(factor_rows) >= 0 else (factor >= 0).astype(w.dtype)
        read = LowRankRead(w, _read_slice(b, clipped), _read_slice(a, clipped), scale, self.groups)
        return self.apply(read)

    def materialise(self) -> Any:
        if self.factors is None:
            return self.apply(take_rows(self.data, self.rows))
        b, a, factor_rows = self.factors
        return self.apply(stacked_deltas(self.data, self.rows, b, a, factor_rows))


def _read_slice(data: jax.Array, row: jax.Array) -> jax.Array:
    """`data[row]`: one slice of a stacked tie, read inside a rewritten scan."""
    start = (row, *([jnp.zeros((), row.dtype)] * (data.ndim - 1)))
    return lax.squeeze(lax.dynamic_slice(data, start, (1, *data.shape[1:])), (0,))


def _recompute_slices(datas: Sequence[Any]) -> Callable[..., bool]:
    """A checkpoint policy that saves every residual except slices read by `StackedRead.read`
    (and the elementwise ops, such as casts, and transposes applied to them).

    Without it, differentiating the rewritten scan stores each iteration's slice: an `L`-fold
    copy again. A slice is a cheap read of a loop-invariant buffer, so the backward pass rereads
    it. (Policies see primitives and avals only; a user `dynamic_slice` or transpose of an operand
    with the very same shape is also recomputed, which costs a read of that operand.)
    """
    data_shapes = {tuple(jax.typeof(d).shape) for d in datas}
    slice_shapes = {(1, *shape[1:]) for shape in data_shapes}
    read_shapes = {shape[1:] for shape in data_shapes}

    def policy(primitive: Any, *avals: Any, **params: Any) -> bool:
        if primitive is _primitives.dynamic_slice_p:
            return tuple(avals[0].shape) not in data_shapes
        if primitive is _primitives.squeeze_p:
            return tuple(avals[0].shape) not in slice_shapes
        if primitive in _compat.ELEMENTWISE and avals:
            return tuple(avals[0].shape) not in read_shapes
        if primitive is _primitives.transpose_p:  # `w.T` of a slice: an `L`-fold stack of `w.T`
            return tuple(avals[0].shape) not in read_shapes
        return True

    return policy


class _Context(NamedTuple):
    """What the rules of one `evaluate` see: the tied variables, and where FFN sites go."""

    tied: set[Any]
    routing: Routing | None

    def tied_inputs(self, eqn: Any, invals: Sequence[Any]) -> list[bool]:
        """Which inputs of `eqn` are tied: stacked reads, and tied variables."""
        return [
            _is_lazy(x) or (not _compat.is_literal(v) and v in self.tied)
            for v, x in zip(eqn.invars, invals, strict=True)
        ]


def _is_lazy(x: Any) -> bool:
    return isinstance(x, StackedRead | LowRankRead)


def _materialised(values: Sequence[Any]) -> list[Any]:
    return [v.materialise() if _is_lazy(v) else v for v in values]


def evaluate(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    tied: Sequence[bool] | None = None,
    routing: Routing | None = None,
) -> list[Any]:
    """Evaluates the open `jaxpr` on `args`, rewriting reads of tied parameters.

    - `args` may hold `StackedRead`s, which the rules rewrite.
    - `tied[i]` says whether `args[i]` is a tied parameter; with `routing`, FFNs on tied weights
      are served by `kernels.ffn` (see `_ffn_routing`), here and inside scan/jit/checkpoint.

    Without either, nothing is rewritten: `jaxpr` is evaluated as traced.
    """
    if routing is None and not any(_is_lazy(a) for a in args):
        return _compat.eval_jaxpr(jaxpr, consts, *args)
    tied = [False] * len(args) if tied is None else list(tied)
    tied_vars = {v for v, t, a in zip(jaxpr.invars, tied, args, strict=True) if t or _is_lazy(a)}
    sites: dict[int, FFNSite] = {}
    decisions: dict[int, RoutedFFN] = {}
    if routing is not None:
        tied_vars = tied_through_casts(jaxpr, tied_vars)
        found = find_ffn_sites(jaxpr, tied_vars)
        relaxed = tied_through_casts(
            jaxpr,
            {v for v, a in zip(jaxpr.invars, args, strict=True) if isinstance(a, LowRankRead)},
        )
        decisions = {
            index: left_to_xla(site, _RELAXED_SITE)
            if any(linear.w in relaxed for linear in (*site.ins, site.down))
            else decide(site, routing)
            for index, site in found.items()
        }
        sites = {i: s for i, s in found.items() if decisions[i].implementation is not None}
    context = _Context(tied_vars, routing)
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))
    consumed = {i for site in sites.values() for i in site.equations}

    def value(atom: Any) -> Any:
        (x,) = _materialised([_interpret.read(env, atom)])
        return x

    start = 0
    for last, site in sorted(sites.items()):  # each site is served where its output is computed
        eqns = [jaxpr.eqns[i] for i in range(start, last) if i not in consumed]
        _interpret.run(eqns, env, _rules, context)
        env[site.down.out] = serve(site, value, decisions[last], routing)
        start = last + 1
    _interpret.run(jaxpr.eqns[start:], env, _rules, context)
    return [value(v) for v in jaxpr.outvars]


_RELAXED_SITE = (
    "relaxed tie: its weights are W + B @ A per member, computed as x @ W + (x @ B) @ A; the "
    "kernel takes plain weights"
)


def _default_rule(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
    """Any other primitive: bound as traced, building any stack it reads (with a warning) and
    any relaxed member's `W + B A` (for this use only)."""
    if any(_is_lazy(v) for v in invals):
        _warn_materialised(eqn, invals)
        invals = _materialised(invals)
    return _compat.bind_equation(eqn, invals)


_rules = _interpret.Rules(default=_default_rule)
"""The rewrite's rules, keyed on primitive objects; registered after each rule."""


def _descending(
    rule: Callable[[Any, list[Any], list[bool], Routing | None], list[Any]],
) -> _interpret.Rule:
    """A rule of a higher-order primitive, which runs when a stacked read goes in, or (with FFN
    routing) a tied value, as FFN sites may be inside; otherwise the equation is bound as traced.
    The rule gets which inputs are tied, and the routing."""

    @functools.wraps(rule)
    def apply(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
        tied = context.tied_inputs(eqn, invals)
        if any(_is_lazy(v) for v in invals) or (context.routing is not None and any(tied)):
            return rule(eqn, invals, tied, context.routing)
        return _compat.bind_equation(eqn, invals)

    return apply


SLICE_READS: frozenset[Any] = frozenset(
    {_primitives.slice_p, _primitives.dynamic_slice_p, _primitives.gather_p, _primitives.squeeze_p}
)


def _warn_materialised(eqn: Any, invals: Sequence[Any]) -> None:
    """Warns that a stack is built (a relaxed member's `W + B A` is built without a word: it is
    one member, as large as the untied leaf)."""
    groups = sorted({g for v in invals if isinstance(v, StackedRead) for g in v.groups})
    if not groups:
        return
    warnings.warn(
        f"Stacked tie group(s) {groups} are read by `{eqn.primitive.name}` in a way tietransform "
        "does not rewrite: the full stacked array is built there (values and gradients are "
        "correct; memory is L-fold). Pass the stack to `lax.scan` as `xs` (elementwise "
        "operations such as casts may come first) or read one slice at a time to avoid the copy.",
        StackMaterialisedWarning,
        stacklevel=3,
    )


def _slice_read_rule(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
    """A slice of a stack reads only what it keeps: a gather XLA fuses into the read."""
    return _compat.bind_equation(eqn, _materialised(invals))


_rules.update(dict.fromkeys(SLICE_READS, _slice_read_rule))


def _elementwise_rule(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
    """An elementwise primitive of one stacked read (and scalars) stays stacked: it is deferred
    to each slice as it is read, `op(data[rows[i]])`. A cast of a relaxed read casts `W`, `B` and
    `A` each (as a hand-written LoRA in that dtype does) and stays lazy. Anything else builds the
    stack, or the relaxed member's `W + B A`."""
    lazy = [i for i, v in enumerate(invals) if _is_lazy(v)]
    if not lazy:
        return _compat.bind_equation(eqn, invals)
    others_scalar = all(_is_lazy(v) or jnp.ndim(v) == 0 for v in invals)
    relaxed = any(
        isinstance(v, LowRankRead) or (isinstance(v, StackedRead) and v.factors is not None)
        for v in invals
    )
    is_cast = eqn.primitive is _primitives.convert_element_type_p
    if (
        len(lazy) != 1
        or not others_scalar
        or eqn.primitive.multiple_results
        or (relaxed and not is_cast)
    ):
        _warn_materialised(eqn, invals)
        return _compat.bind_equation(eqn, _materialised(invals))
    (position,) = lazy
    op = functools.partial(_bind_at, eqn, tuple(invals), position)
    source = invals[position]
    if isinstance(source, LowRankRead):
        return [source.map(op)]
    (var,) = eqn.outvars
    return [source.with_op(op, var.aval)]


_rules.update(dict.fromkeys(_compat.ELEMENTWISE, _elementwise_rule))


def _bind_at(eqn: Any, invals: tuple[Any, ...], position: int, value: Any) -> Any:
    values = list(invals)
    values[position] = value
    return _compat.bind_equation(eqn, values)[0]


def _dot_rule(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
    """A matmul of a relaxed member is `x @ W + (x @ B) @ A`: `W + B A` is never built."""
    if any(isinstance(v, LowRankRead) for v in invals) and not any(
        isinstance(v, StackedRead) for v in invals
    ):
        out = low_rank_dot(eqn, invals, lambda e, values: _compat.bind_equation(e, values)[0])
        if out is not None:
            (var,) = eqn.outvars
            return [out.astype(var.aval.dtype)]
    return _default_rule(eqn, invals, context)


_rules[_primitives.dot_general_p] = _dot_rule


def _transpose_rule(eqn: Any, invals: list[Any], context: _Context) -> list[Any]:
    """A relaxed matrix transposed stays lazy: `(W + B A)^T = W^T + A^T B^T`."""
    (x,) = invals
    if isinstance(x, LowRankRead) and tuple(eqn.params["permutation"]) == (1, 0):
        return [x.transpose()]
    return _default_rule(eqn, invals, context)


_rules[_primitives.transpose_p] = _transpose_rule


def _jit_rule(eqn: Any, invals: list[Any], tied: list[bool], routing: Routing | None) -> list[Any]:
    inner, consts = _compat.call_jaxpr(eqn)
    return evaluate(inner, consts, invals, tied, routing)


_rules.update(dict.fromkeys(_compat.CALL_PRIMITIVES, _descending(_jit_rule)))


def _scan_rule(eqn: Any, invals: list[Any], tied: list[bool], routing: Routing | None) -> list[Any]:
    num_consts, num_carry = _compat.scan_layout(eqn.params)
    if any(_is_lazy(v) for v in invals[: num_consts + num_carry]):
        _warn_materialised(eqn, invals[: num_consts + num_carry])  # a const or carry, not xs
    # A relaxed member read in the body stays lazy (a loop constant); a stack is built.
    consts = [
        v if isinstance(v, LowRankRead) else _materialised([v])[0] for v in invals[:num_consts]
    ]
    init = _materialised(invals[num_consts : num_consts + num_carry])
    xs = [
        v if isinstance(v, StackedRead) else _materialised([v])[0]
        for v in invals[num_consts + num_carry :]
    ]
    body, body_consts = _compat.split_jaxpr(eqn.params["jaxpr"])
    body_tied = [*tied[:num_consts], *([False] * num_carry), *tied[num_consts + num_carry :]]
    scanned = [x.index() if _is_lazy(x) else x for x in xs]

    def step(carry: list[Any], xs_slice: list[Any]) -> tuple[list[Any], list[Any]]:
        x_values = [
            x.read(row) if _is_lazy(x) else row for x, row in zip(xs, xs_slice, strict=True)
        ]
        outs = evaluate(body, body_consts, [*consts, *carry, *x_values], body_tied, routing)
        return outs[:num_carry], outs[num_carry:]

    lazy_data = [a for x in xs if _is_lazy(x) for a in x.arrays()]
    if lazy_data:
        policy = _recompute_slices(lazy_data)
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)  # scan already prevents CSE
    carry, ys = lax.scan(step, init, scanned, **_compat.scan_options(eqn.params))
    return [*carry, *ys]


_rules[_primitives.scan_p] = _descending(_scan_rule)


def _checkpoint_rule(
    eqn: Any, invals: list[Any], tied: list[bool], routing: Routing | None
) -> list[Any]:
    inner, consts = _compat.call_jaxpr(eqn)
    flat = [v.arrays() if _is_lazy(v) else v for v in invals]

    def rematerialised(*flat_args: Any) -> list[Any]:
        args = [
            v.with_arrays(f) if _is_lazy(v) else f for f, v in zip(flat_args, invals, strict=True)
        ]
        return evaluate(inner, consts, args, tied, routing)

    return jax.checkpoint(rematerialised, **_compat.checkpoint_options(eqn.params))(*flat)


_rules.update(dict.fromkeys(_compat.CHECKPOINT_PRIMITIVES, _descending(_checkpoint_rule)))


def live_inputs(jaxpr: Any, live_outputs: Sequence[bool] | None = None) -> list[bool]:
    """Which of `jaxpr.invars` can affect a live output (or an effect). Recurses into `jit` and
    `checkpoint`; other equations count all their inputs as read."""
    live_outputs = [True] * len(jaxpr.outvars) if live_outputs is None else live_outputs
    live: set[Any] = {
        v
        for v, keep in zip(jaxpr.outvars, live_outputs, strict=True)
        if keep and not _compat.is_literal(v)
    }
    for eqn in reversed(jaxpr.eqns):
        outs_live = [v in live for v in eqn.outvars]
        if not any(outs_live) and not eqn.effects:
            continue
        if eqn.primitive in _compat.CALLS:
            inner, _ = _compat.call_jaxpr(eqn)
            ins_live = (
                live_inputs(inner, outs_live) if not eqn.effects else [True] * len(eqn.invars)
            )
        else:
            ins_live = [True] * len(eqn.invars)
        live.update(
            v
            for v, keep in zip(eqn.invars, ins_live, strict=True)
            if keep and not _compat.is_literal(v)
        )
    return [v in live for v in jaxpr.invars]

"""Finding FFNs on tied weights in a jaxpr, and serving them with the fused kernels.

A plain site is the subgraph

    h = x @ W1            dot_general contracting x's last axis with a tied rank-2 weight
                          (either orientation of W1; a `transpose` back to tokens-first allowed)
    h = h + b1            optional: `add` of a `broadcast_in_dim` of a vector along the last axis
    a = act(h)            elementwise equations only (scalar literals as other operands), or a
                          `jit` of such, or a known `custom_jvp` activation (relu)
    y = a @ W2 (+ b2)     as above, with W2 tied too

and a gated site (SwiGLU, GeGLU) has two projections of the same `x`, `z_g = x @ Wg (+ bg)` and
`z_u = x @ Wu (+ bu)`, with `a = act(z_g) * z_u`. Intermediates must be used nowhere else.
"Tied" includes a tied weight cast by `convert_element_type` between float32/bfloat16/float16
(mixed precision): the kernel gets the cast operands and the gradient flows back through the cast.

Each site found is decided by the kernels' own support rules (`kernels.ffn_support`: dtype,
shapes, the backend that will run it). A site the kernel serves is replaced by
`kernels.ffn(x, W1, b1, W2, b2, activation=act)` (or `kernels.gated_ffn`), the activation
re-evaluated from the traced equations; any other site is left as traced (XLA), silently in the
default mode and with a one-time warning when the kernel was asked for. Either way the site is
reported to `ffn_routing_report`.
"""

import contextlib
import contextvars
import dataclasses
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import primitives as _primitives

from . import _compat
from ._errors import warn_once


ELEMENTWISE: frozenset[Any] = frozenset(
    getattr(_primitives, f"{name}_p")
    for name in """neg sin cos tan tanh logistic exp exp2 log log1p expm1 sqrt rsqrt cbrt abs sign
    integer_pow pow mul add sub div max min erf erfc erf_inv square atan asin acos sinh cosh asinh
    acosh atanh convert_element_type select_n lt gt le ge eq ne copy""".split()
)
# Elementwise primitives, as objects of `jax.extend.core.primitives` (all exist in 0.10-0.12).
KNOWN_CUSTOM_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
}


Implementation = Literal["auto", "pallas", "interpret", "xla", "xla_remat"]
"""The implementations of `kernels.ffn` and `kernels.gated_ffn` (the one list of their names)."""
IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Implementation)


@dataclasses.dataclass(frozen=True)
class Routing:
    """Where FFN sites go: `implementation` is passed to `kernels.ffn`/`kernels.gated_ffn`.

    `warns`: the user asked for the kernel (`fuse_ffn=True` or an implementation name), so a site
    it cannot serve is reported with a one-time warning; the default mode leaves such sites to
    XLA silently.
    """

    implementation: Implementation
    warns: bool


def routing_for(fuse_ffn: bool | Implementation | None) -> Routing | None:
    """The routing `tie(..., fuse_ffn=...)` asks for.

    `None`: the compiled kernels where a Pallas backend exists (GPU, TPU), silently leaving what
    they cannot serve to XLA; off on CPU. `True`: on everywhere (interpret mode on CPU), warning
    once per site the kernel cannot serve. `False`: off. A string is an implementation of
    `kernels.ffn`, as explicit as `True`.
    """
    if isinstance(fuse_ffn, str):
        if fuse_ffn not in IMPLEMENTATIONS:
            raise ValueError(
                f"fuse_ffn={fuse_ffn!r} is not an implementation of kernels.ffn; use one of "
                f"{', '.join(map(repr, IMPLEMENTATIONS))}, or a bool."
            )
        return Routing(fuse_ffn, warns=True)  # type: ignore[arg-type]  # checked just above
    if fuse_ffn is False:
        return None
    accelerated = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    if fuse_ffn is None:
        return Routing("pallas", warns=False) if accelerated else None
    if fuse_ffn is True:
        return Routing("pallas" if accelerated else "interpret", warns=True)
    raise TypeError(f"fuse_ffn must be None, a bool or an implementation name, got {fuse_ffn!r}.")


@dataclasses.dataclass(kw_only=True)
class FFNSite:
    """One matched FFN: the equations it replaces and how to call the kernel.

    Plain: `ws = (W1,)`, the hidden function is the activation region `act_eqns` from
    `act_input` to `act_output`. Gated: `ws = (Wg, Wu)`, `act_eqns` go from the gate's
    pre-activation to `act(z_g)`, which one `mul` (also consumed) multiplies by `z_u`.
    """

    consumed: frozenset[int]
    last: int
    x: Any
    ws: tuple[Any, ...]
    ws_transposed: tuple[bool, ...]
    bs: tuple[Any | None, ...]
    w2: Any
    w2_transposed: bool
    b2: Any | None
    act_input: Any
    act_output: Any
    act_eqns: tuple[Any, ...]
    out: Any
    activation_name: str

    @property
    def gated(self) -> bool:
        return len(self.ws) == 2

    def describe(self) -> str:
        hidden = _oriented(self.ws[0], self.ws_transposed[0])[1]
        d_out = _oriented(self.w2, self.w2_transposed)[1]
        kind = "gated FFN" if self.gated else "FFN"
        return f"{kind} {self.x.aval.str_short()} -> {hidden} -> {d_out}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedFFN:
    """A report line: one FFN site on tied weights that `tie` found, and what served it.

    `shape` reads `dtype[tokens..., d] -> hidden -> d_out` (prefixed `gated ` for a gated FFN);
    `served_by` is `"kernels.ffn[<implementation>]"` (or `kernels.gated_ffn[...]`) when the kernel
    was called, or `"XLA"` when the site was left as traced; `implementation` is the
    implementation that ran (never one that did not), `None` when left to XLA; `reason` says why
    a site was left to XLA.
    """

    shape: str
    activation: str
    implementation: str | None
    served_by: str = "XLA"
    reason: str | None = None

    def __str__(self) -> str:
        where = self.served_by if self.reason is None else f"left to XLA: {self.reason}"
        return f"{self.shape}, activation {self.activation}: {where}"


_report: contextvars.ContextVar[list[RoutedFFN] | None] = contextvars.ContextVar(
    "tietransform_ffn_report", default=None
)


@contextlib.contextmanager
def ffn_routing_report() -> Iterator[list[RoutedFFN]]:
    """Collects every FFN site on tied weights that `tie(..., fuse_ffn=...)` finds while tracing
    in this block, with what served it (a kernel, or XLA and why).

    !!! Example
        ```python
        with tt.ffn_routing_report() as routed:
            jax.make_jaxpr(tied_loss)(packed, x)
        print(*routed, sep="\\n")
        ```
    """
    sites: list[RoutedFFN] = []
    token = _report.set(sites)
    try:
        yield sites
    finally:
        _report.reset(token)


def _uses(jaxpr: Any) -> dict[Any, list[int]]:
    uses: dict[Any, list[int]] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not _compat.is_literal(v):
                uses.setdefault(v, []).append(index)
    for v in jaxpr.outvars:
        if not _compat.is_literal(v):
            uses.setdefault(v, []).append(-1)
    return uses


def _kernel_dtypes() -> tuple[Any, ...]:
    from .kernels import SUPPORTED_DTYPES

    return SUPPORTED_DTYPES


def _rank(atom: Any) -> int:
    return len(atom.aval.shape)


def _is_elementwise_jaxpr(jaxpr: Any) -> bool:
    """Every equation is elementwise and reads only the inputs' descendants (or literals).

    A closed-over array (a constvar, e.g. a per-unit scale) is not elementwise in the inputs: the
    kernel applies the activation to `(block_m, block_h)` tiles, where such an array would not
    line up with the tile.
    """
    derived = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        operands = [v for v in eqn.invars if not _compat.is_literal(v)]
        if _elementwise_kind(eqn) is None or any(v not in derived for v in operands):
            return False
        if any(o.aval.shape != operands[0].aval.shape for o in eqn.outvars if operands):
            return False
        derived.update(eqn.outvars)
    return all(_compat.is_literal(v) or v in derived for v in jaxpr.outvars)


def _elementwise_kind(eqn: Any) -> str | None:
    """`"prim"`, `"jit"` or a known activation name if `eqn` is elementwise; else None."""
    if eqn.primitive in ELEMENTWISE:
        return "prim"
    if eqn.primitive in _compat.CALL_PRIMITIVES:
        inner, _ = _compat.call_jaxpr(eqn)
        return "jit" if _is_elementwise_jaxpr(inner) else None
    known = _compat.jax_nn_custom_jvp_name(eqn)
    if known in KNOWN_CUSTOM_ACTIVATIONS:
        return known
    return None


class _Dot(NamedTuple):
    """`x @ w` (or `w`-first, transposed back): `out` is its value, `eqns` what it spans."""

    x: Any
    w: Any
    transposed: bool
    out: Any
    eqns: list[int]


class _Bias(NamedTuple):
    """`value + broadcast(b)` along the last axis."""

    b: Any
    out: Any
    eqns: list[int]


class _Region(NamedTuple):
    """An elementwise region whose value `a` is consumed by the dot at equation `dot`."""

    eqns: list[int]
    a: Any
    dot: int


class _Projection(NamedTuple):
    """`x @ W (+ b)`: `value` is the projection's output."""

    x: Any
    w: Any
    transposed: bool
    b: Any
    value: Any
    eqns: list[int]


class _GateSplit(NamedTuple):
    """A gated region `act(z_gate) * z_up`: the gate's pre-activation, its activation value, the
    gate's equations, and the multiply's index."""

    z_gate: Any
    gate: Any
    eqns: list[int]
    mul: int


class _Matcher:
    def __init__(self, jaxpr: Any, tied: set[Any]):
        self.jaxpr = jaxpr
        self.eqns = jaxpr.eqns
        self.tied = tied
        self.uses = _uses(jaxpr)
        self.producer = {v: i for i, e in enumerate(self.eqns) for v in e.outvars}

    def only_use(self, var: Any) -> int | None:
        uses = self.uses.get(var, [])
        return uses[0] if len(uses) == 1 and uses[0] >= 0 else None

    def dot(self, index: int, x_var: Any | None) -> _Dot | None:
        """Matches a dot of `x` with a tied rank-2 weight."""
        eqn = self.eqns[index]
        if eqn.primitive is not _primitives.dot_general_p:
            return None
        (contract, batch) = eqn.params["dimension_numbers"]
        if tuple(batch[0]) or tuple(batch[1]):
            return None
        for w_pos in (1, 0):
            w, x = eqn.invars[w_pos], eqn.invars[1 - w_pos]
            if _compat.is_literal(w) or w not in self.tied or _rank(w) != 2:
                continue
            if x_var is not None and x is not x_var:
                continue
            x_contract, w_contract = tuple(contract[1 - w_pos]), tuple(contract[w_pos])
            if x_contract != (_rank(x) - 1,) or len(w_contract) != 1:
                continue
            if eqn.params.get("preferred_element_type") not in (None, x.aval.dtype):
                continue
            out, consumed = eqn.outvars[0], [index]
            if w_pos == 0 and _rank(x) > 1:  # (hidden, tokens...): must be transposed back
                nxt = self.only_use(out)
                expected = (*range(1, _rank(x)), 0)
                if nxt is None or self.eqns[nxt].primitive is not _primitives.transpose_p:
                    continue
                if tuple(self.eqns[nxt].params["permutation"]) != expected:
                    continue
                out, consumed = self.eqns[nxt].outvars[0], [index, nxt]
            return _Dot(x, w, w_contract == (1,), out, consumed)
        return None

    def bias(self, value: Any) -> _Bias | None:
        """Matches `value + broadcast(b)` along the last axis."""
        add = self.only_use(value)
        if add is None or self.eqns[add].primitive is not _primitives.add_p:
            return None
        other = [v for v in self.eqns[add].invars if v is not value]
        if len(other) != 1 or _compat.is_literal(other[0]):
            return None
        (b,) = other
        width = value.aval.shape[-1]
        if b.aval.shape == (width,) and _rank(value) == 1:
            return _Bias(b, self.eqns[add].outvars[0], [add])
        # b is the vector reshaped to (1, ..., 1, width) by one or more broadcasts/reshapes
        # (vmap adds one): walk back through them to the vector.
        chain: list[int] = []
        user = add
        while True:
            source = self.producer.get(b)
            if source is None or self.only_use(b) != user:
                return None
            step = self.eqns[source]
            if step.primitive not in (_primitives.broadcast_in_dim_p, _primitives.reshape_p):
                return None
            if any(d != 1 for d in b.aval.shape[:-1]) or b.aval.shape[-1:] != (width,):
                return None
            if step.primitive is _primitives.broadcast_in_dim_p and (
                step.params["broadcast_dimensions"][-1:] != (_rank(b) - 1,)
            ):
                return None
            chain.append(source)
            b, user = step.invars[0], source
            if _compat.is_literal(b):
                return None
            if b.aval.shape == (width,):
                return _Bias(b, self.eqns[add].outvars[0], [*chain, add])

    def region(self, starts: Sequence[Any], after: int, skip: Sequence[int] = ()) -> _Region | None:
        """The elementwise region from `starts` up to the dot that consumes it."""
        region_vars, region = set(starts), []
        shape = starts[0].aval.shape
        for index in range(after + 1, len(self.eqns)):
            if index in skip:
                continue
            eqn = self.eqns[index]
            touched = [v for v in eqn.invars if not _compat.is_literal(v) and v in region_vars]
            if not touched:
                continue
            if eqn.primitive is _primitives.dot_general_p:
                (a,) = touched if len(touched) == 1 else (None,)
                if a is None:
                    return None
                inside = set(region)
                for var in region_vars:
                    if any(
                        u not in inside and not (var is a and u == index)
                        for u in self.uses.get(var, [])
                    ):
                        return None
                return _Region(region, a, index)
            others = [v for v in eqn.invars if not _compat.is_literal(v) and v not in region_vars]
            if others or _elementwise_kind(eqn) is None:
                return None
            if any(o.aval.shape != shape for o in eqn.outvars):
                return None
            region.append(index)
            region_vars.update(eqn.outvars)
        return None

    def projection(self, index: int, x_var: Any | None) -> _Projection | None:
        """`x @ W (+ b)` at equation `index`."""
        first = self.dot(index, x_var)
        if first is None:
            return None
        x, w, w_t, h, consumed = first
        b = None
        bias = self.bias(h)
        if bias is not None:
            b, h, more = bias
            consumed = consumed + more
        return _Projection(x, w, w_t, b, h, consumed)

    def gate_and_up(self, region: list[int], a: Any, z0: Any, z1: Any) -> _GateSplit | None:
        """Splits a gated region `act(z_g) * z_u` into the gate's part and the multiply."""
        if not region or self.producer.get(a) != region[-1]:
            return None
        mul = self.eqns[region[-1]]
        if mul.primitive is not _primitives.mul_p or any(_compat.is_literal(v) for v in mul.invars):
            return None
        depends: dict[Any, set[Any]] = {z0: {z0}, z1: {z1}}
        for i in region[:-1]:
            eqn = self.eqns[i]
            deps = set().union(*(depends[v] for v in eqn.invars if not _compat.is_literal(v)))
            depends.update({o: deps for o in eqn.outvars})
        p, q = mul.invars
        for gate_side, up_side in ((p, q), (q, p)):
            for z_g, z_u in ((z0, z1), (z1, z0)):
                if up_side is z_u and depends.get(gate_side) == {z_g}:
                    return _GateSplit(z_g, gate_side, region[:-1], region[-1])
        return None

    def site_at(self, index: int) -> FFNSite | None:
        first = self.projection(index, None)
        if first is None:
            return None
        x, w1, w1_t, b1, h, consumed = first
        act = self.region([h], max(consumed))
        if act is not None:
            region, a, dot2 = act
            return self.finish(consumed + region, x, ((w1, w1_t, b1),), h, a, region, dot2)
        for other in range(len(self.eqns)):  # gated: a second projection of the same x
            if other == index or other in consumed:
                continue
            second = self.projection(other, x)
            if second is None or second.w is w1 or second.w.aval.shape != w1.aval.shape:
                continue
            _, w_o, w_o_t, b_o, h_o, more = second
            if (w_o_t != w1_t) or set(more) & set(consumed):
                continue
            act = self.region([h, h_o], max(consumed), skip=more)
            if act is None:
                continue
            region, a, dot2 = act
            split = self.gate_and_up(region, a, h, h_o)
            if split is None:
                continue
            z_g, a_g, gate_eqns, _ = split
            projections = ((w1, w1_t, b1), (w_o, w_o_t, b_o))
            if z_g is h_o:
                projections = projections[::-1]
            return self.finish(
                consumed + more + region, x, projections, z_g, a_g, gate_eqns, dot2, gated_a=a
            )
        return None

    def finish(
        self,
        consumed: list[int],
        x: Any,
        projections: Sequence[tuple[Any, bool, Any | None]],
        act_input: Any,
        act_output: Any,
        act_region: list[int],
        dot2: int,
        gated_a: Any | None = None,
    ) -> FFNSite | None:
        second = self.dot(dot2, act_output if gated_a is None else gated_a)
        if second is None:
            return None
        _, w2, w2_t, out, more = second
        consumed = consumed + more
        b2 = None
        bias = self.bias(out)
        if bias is not None:
            b2, out, more = bias
            consumed = consumed + more
        if out.aval.shape[:-1] != x.aval.shape[:-1] or out.aval.dtype != x.aval.dtype:
            return None
        act_eqns = tuple(self.eqns[i] for i in act_region)
        names = [_elementwise_kind(e) for e in act_eqns]
        name = next((n for n in names if n not in ("prim", "jit")), None) or (
            "traced elementwise" if act_eqns else "identity"
        )
        return FFNSite(
            consumed=frozenset(consumed),
            last=max(consumed),
            x=x,
            ws=tuple(w for w, _, _ in projections),
            ws_transposed=tuple(t for _, t, _ in projections),
            bs=tuple(b for _, _, b in projections),
            w2=w2,
            w2_transposed=w2_t,
            b2=b2,
            act_input=act_input,
            act_output=act_output,
            act_eqns=act_eqns,
            out=out,
            activation_name=name,
        )


def tied_through_casts(jaxpr: Any, tied: set[Any]) -> set[Any]:
    """`tied` plus every value cast from a tied one by `convert_element_type` between float32,
    bfloat16 and float16 (a mixed-precision loss reads its tied weights through such casts)."""
    out = set(tied)
    for eqn in jaxpr.eqns:
        if eqn.primitive is not _primitives.convert_element_type_p:
            continue
        if _compat.is_literal(eqn.invars[0]) or eqn.invars[0] not in out:
            continue
        source, target = eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype
        if source in _CAST_DTYPES and target in _CAST_DTYPES:
            out.add(eqn.outvars[0])
    return out


_CAST_DTYPES = frozenset(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))


def find_ffn_sites(jaxpr: Any, tied: set[Any]) -> dict[int, FFNSite]:
    """The FFN sites at the top level of `jaxpr` whose weights are in `tied`, by last equation."""
    if not tied:
        return {}
    matcher = _Matcher(jaxpr, tied)
    sites: dict[int, FFNSite] = {}
    taken: set[int] = set()
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is not _primitives.dot_general_p or index in taken:
            continue
        site = matcher.site_at(index)
        if site is not None and not (site.consumed & taken):
            sites[site.last] = site
            taken |= site.consumed
    return sites


def _eval_elementwise(eqns: Sequence[Any], env: dict[Any, Any]) -> None:
    for eqn in eqns:
        invals = [v.val if _compat.is_literal(v) else env[v] for v in eqn.invars]
        kind = _elementwise_kind(eqn)
        if kind == "prim":
            outs = _compat.bind_elementwise(eqn, invals)
        elif kind == "jit":
            inner, consts = _compat.call_jaxpr(eqn)
            inner_env = dict(
                zip([*inner.constvars, *inner.invars], [*consts, *invals], strict=True)
            )
            _eval_elementwise(inner.eqns, inner_env)
            outs = [v.val if _compat.is_literal(v) else inner_env[v] for v in inner.outvars]
        elif kind is not None:
            outs = [KNOWN_CUSTOM_ACTIVATIONS[kind](*invals)]
        else:  # pragma: no cover - sites only hold elementwise equations
            raise AssertionError(f"not elementwise: {eqn.primitive.name}")
        env.update(zip(eqn.outvars, outs, strict=True))


def _oriented(w: Any, transposed: bool) -> tuple[int, ...]:
    shape = tuple(w.aval.shape)
    return shape[::-1] if transposed else shape


def decide(site: FFNSite, routing: Routing) -> RoutedFFN:
    """What serves `site` under `routing`, by the kernels' own support rules
    (`kernels.ffn_support`); reported (and, if the kernel was asked for, warned about once)."""
    from .kernels import ffn_support

    def spec(w: Any, transposed: bool) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(_oriented(w, transposed), w.aval.dtype)

    ws = tuple(spec(w, t) for w, t in zip(site.ws, site.ws_transposed, strict=True))
    biases = tuple(b.aval for b in (*site.bs, site.b2) if b is not None)
    support = ffn_support(
        site.x.aval,
        ws,
        spec(site.w2, site.w2_transposed),
        biases=biases,
        implementation=routing.implementation,
    )
    kernel = "kernels.gated_ffn" if site.gated else "kernels.ffn"
    if support.reason is None:
        decision = RoutedFFN(
            shape=site.describe(),
            activation=site.activation_name,
            implementation=support.implementation,
            served_by=f"{kernel}[{support.implementation}]",
        )
    else:
        decision = RoutedFFN(
            shape=site.describe(),
            activation=site.activation_name,
            implementation=None,
            served_by="XLA",
            reason=support.reason,
        )
        message = (
            f"tie(fuse_ffn={routing.implementation!r}): {decision.shape}, activation "
            f"{decision.activation}, is left to XLA: {support.reason}."
        )
        if routing.warns:
            warn_once(message)
    report = _report.get()
    if report is not None:
        report.append(decision)
    return decision


def serve(site: FFNSite, read: Callable[[Any], Any], decision: RoutedFFN) -> Any:
    """Computes the site's output with `kernels.ffn` or `kernels.gated_ffn`."""
    from .kernels import ffn, gated_ffn

    act_dtype = site.act_input.aval.dtype

    def activation(z: jax.Array) -> jax.Array:
        env = {site.act_input: z.astype(act_dtype)}
        _eval_elementwise(site.act_eqns, env)
        return env[site.act_output].astype(z.dtype)

    ws = [
        jnp.transpose(read(w)) if t else read(w)
        for w, t in zip(site.ws, site.ws_transposed, strict=True)
    ]
    w2 = read(site.w2)
    w2 = jnp.transpose(w2) if site.w2_transposed else w2
    bs = [None if b is None else read(b) for b in site.bs]
    b2 = None if site.b2 is None else read(site.b2)
    implementation: Any = decision.implementation
    if site.gated:
        return gated_ffn(
            read(site.x),
            ws[0],
            ws[1],
            w2,
            bg=bs[0],
            bu=bs[1],
            b2=b2,
            activation=activation,
            implementation=implementation,
        )
    return ffn(
        read(site.x), ws[0], bs[0], w2, b2, activation=activation, implementation=implementation
    )

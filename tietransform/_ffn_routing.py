"""Finding FFNs on tied weights in a jaxpr, and serving them with the fused kernel `kernels.ffn`.

A site is the subgraph

    h = x @ W1            dot_general contracting x's last axis with a tied rank-2 weight
                          (either orientation of W1; a `transpose` back to tokens-first allowed)
    h = h + b1            optional: `add` of a `broadcast_in_dim` of a vector along the last axis
    a = act(h)            elementwise equations only (scalar literals as other operands), or a
                          `jit` of such, or a known `custom_jvp` activation (relu)
    y = a @ W2 (+ b2)     as above, with W2 tied too

whose intermediates are used nowhere else. It is replaced by
`kernels.ffn(x, W1, b1, W2, b2, activation=act)`, the activation re-evaluated from the traced
equations. Anything else (an untied weight, a non-elementwise middle, an intermediate read
elsewhere) is left alone.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from . import _compat


ELEMENTWISE = frozenset(
    """neg sin cos tan tanh logistic exp exp2 log log1p expm1 sqrt rsqrt cbrt abs sign integer_pow
    pow mul add sub div max min erf erfc erf_inv square atan asin acos sinh cosh asinh acosh atanh
    convert_element_type select_n lt gt le ge eq ne copy copy_p""".split()
)
KNOWN_CUSTOM_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
}


@dataclasses.dataclass(frozen=True)
class Routing:
    """Where FFN sites go: `implementation` is passed to `kernels.ffn`."""

    implementation: Literal["auto", "pallas", "interpret", "xla", "xla_remat"]


@dataclasses.dataclass
class FFNSite:
    """One matched FFN: the equations it replaces and how to call the kernel."""

    consumed: frozenset[int]
    last: int
    x: Any
    w1: Any
    w1_transposed: bool
    b1: Any | None
    w2: Any
    w2_transposed: bool
    b2: Any | None
    act_input: Any
    act_output: Any
    act_eqns: tuple[Any, ...]
    out: Any
    activation_name: str


@dataclasses.dataclass(frozen=True)
class RoutedFFN:
    """A report line: an FFN site served by the kernel."""

    shape: str
    activation: str
    implementation: str

    def __str__(self) -> str:
        return f"FFN {self.shape}, activation {self.activation}: kernels.ffn[{self.implementation}]"


_report: contextvars.ContextVar[list[RoutedFFN] | None] = contextvars.ContextVar(
    "tietransform_ffn_report", default=None
)


@contextlib.contextmanager
def ffn_routing_report() -> Iterator[list[RoutedFFN]]:
    """Collects the FFN sites that `tie(..., fuse_ffn=...)` routes while tracing in this block.

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
    from kernels import SUPPORTED_DTYPES

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
    name = eqn.primitive.name
    if name in ELEMENTWISE:
        return "prim"
    if name in _compat.JIT_PRIMITIVE_NAMES:
        inner, _ = _compat.split_jaxpr(eqn.params["jaxpr"])
        return "jit" if _is_elementwise_jaxpr(inner) else None
    known = _compat.jax_nn_custom_jvp_name(eqn)
    if known in KNOWN_CUSTOM_ACTIVATIONS:
        return known
    return None


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

    def dot(self, index: int, x_var: Any | None) -> tuple[Any, Any, bool, Any, list[int]] | None:
        """Matches a dot of `x` with a tied rank-2 weight; returns (x, w, transposed, out, eqns)."""
        eqn = self.eqns[index]
        if eqn.primitive.name != "dot_general":
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
                if nxt is None or self.eqns[nxt].primitive.name != "transpose":
                    continue
                if tuple(self.eqns[nxt].params["permutation"]) != expected:
                    continue
                out, consumed = self.eqns[nxt].outvars[0], [index, nxt]
            return x, w, w_contract == (1,), out, consumed
        return None

    def bias(self, value: Any) -> tuple[Any, Any, list[int]] | None:
        """Matches `value + broadcast(b)` along the last axis; returns (b, out, eqns)."""
        add = self.only_use(value)
        if add is None or self.eqns[add].primitive.name != "add":
            return None
        other = [v for v in self.eqns[add].invars if v is not value]
        if len(other) != 1 or _compat.is_literal(other[0]):
            return None
        (b,) = other
        width = value.aval.shape[-1]
        if b.aval.shape == (width,) and _rank(value) == 1:
            return b, self.eqns[add].outvars[0], [add]
        # b is the vector reshaped to (1, ..., 1, width) by one or more broadcasts/reshapes
        # (vmap adds one): walk back through them to the vector.
        chain: list[int] = []
        user = add
        while True:
            source = self.producer.get(b)
            if source is None or self.only_use(b) != user:
                return None
            step = self.eqns[source]
            if step.primitive.name not in ("broadcast_in_dim", "reshape"):
                return None
            if any(d != 1 for d in b.aval.shape[:-1]) or b.aval.shape[-1:] != (width,):
                return None
            if step.primitive.name == "broadcast_in_dim" and (
                step.params["broadcast_dimensions"][-1:] != (_rank(b) - 1,)
            ):
                return None
            chain.append(source)
            b, user = step.invars[0], source
            if _compat.is_literal(b):
                return None
            if b.aval.shape == (width,):
                return b, self.eqns[add].outvars[0], [*chain, add]

    def activation(self, start: Any, after: int) -> tuple[list[int], Any, int] | None:
        """The elementwise region from `start` up to the dot that consumes it: (eqns, a, dot)."""
        region_vars, region = {start}, []
        for index in range(after + 1, len(self.eqns)):
            eqn = self.eqns[index]
            touched = [v for v in eqn.invars if not _compat.is_literal(v) and v in region_vars]
            if not touched:
                continue
            if eqn.primitive.name == "dot_general":
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
                return region, a, index
            others = [v for v in eqn.invars if not _compat.is_literal(v) and v not in region_vars]
            if others or _elementwise_kind(eqn) is None:
                return None
            if any(o.aval.shape != start.aval.shape for o in eqn.outvars):
                return None
            region.append(index)
            region_vars.update(eqn.outvars)
        return None

    def site_at(self, index: int) -> FFNSite | None:
        first = self.dot(index, None)
        if first is None:
            return None
        x, w1, w1_t, h, consumed = first
        b1 = None
        bias = self.bias(h)
        if bias is not None:
            b1, h, more = bias
            consumed += more
        act = self.activation(h, max(consumed))
        if act is None:
            return None
        region, a, dot2 = act
        second = self.dot(dot2, a)
        if second is None:
            return None
        _, w2, w2_t, out, more = second
        consumed += region + more
        b2 = None
        bias = self.bias(out)
        if bias is not None:
            b2, out, more = bias
            consumed += more
        if out.aval.shape[:-1] != x.aval.shape[:-1] or out.aval.dtype != x.aval.dtype:
            return None
        dtypes = {v.aval.dtype for v in (x, w1, w2, b1, b2) if v is not None}
        if len(dtypes) != 1 or x.aval.dtype not in _kernel_dtypes():
            return None  # the kernel takes one floating dtype it supports; XLA serves the rest
        act_eqns = tuple(self.eqns[i] for i in region)
        names = [_elementwise_kind(e) for e in act_eqns]
        name = next((n for n in names if n not in ("prim", "jit")), None) or "traced elementwise"
        return FFNSite(
            frozenset(consumed),
            max(consumed),
            x,
            w1,
            w1_t,
            b1,
            w2,
            w2_t,
            b2,
            h,
            a,
            act_eqns,
            out,
            name,
        )


def find_ffn_sites(jaxpr: Any, tied: set[Any]) -> dict[int, FFNSite]:
    """The FFN sites at the top level of `jaxpr` whose weights are in `tied`, by last equation."""
    if not tied:
        return {}
    matcher = _Matcher(jaxpr, tied)
    sites: dict[int, FFNSite] = {}
    taken: set[int] = set()
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "dot_general" or index in taken:
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
            outs = _compat.bind_equation(eqn, invals)
        elif kind == "jit":
            inner, consts = _compat.split_jaxpr(eqn.params["jaxpr"])
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


def serve(site: FFNSite, read: Callable[[Any], Any], routing: Routing) -> Any:
    """Computes the site's output with `kernels.ffn`."""
    from kernels import ffn

    act_dtype = site.act_input.aval.dtype

    def activation(z: jax.Array) -> jax.Array:
        env = {site.act_input: z.astype(act_dtype)}
        _eval_elementwise(site.act_eqns, env)
        return env[site.act_output].astype(z.dtype)

    w1, w2 = read(site.w1), read(site.w2)
    w1 = jnp.transpose(w1) if site.w1_transposed else w1
    w2 = jnp.transpose(w2) if site.w2_transposed else w2
    b1 = None if site.b1 is None else read(site.b1)
    b2 = None if site.b2 is None else read(site.b2)
    report = _report.get()
    if report is not None:
        shape = f"{site.x.aval.str_short()} -> {w1.shape[1]} -> {w2.shape[1]}"
        report.append(RoutedFFN(shape, site.activation_name, routing.implementation))
    return ffn(
        read(site.x), w1, b1, w2, b2, activation=activation, implementation=routing.implementation
    )

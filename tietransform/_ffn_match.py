"""Finding FFNs on tied weights in a jaxpr: the pure matcher, `find_ffn_sites(jaxpr, tied)`.

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

Every projection, the down projection included, is a `Linear`; a site is its input projections,
its activation and its down projection. The matcher follows the equations that read each value
(`_Graph.uses`, and `_Graph.dots` for the dots reading it), so matching a site costs what the site
spans, not a scan of the jaxpr. Deciding, reporting and serving the sites is `_ffn_routing`'s.
"""

import heapq
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import primitives as _primitives

from . import _compat


KNOWN_CUSTOM_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
}
"""`custom_jvp` activations of `jax.nn` that a site may hold, by name."""


class Linear(NamedTuple):
    """`out = x @ w (+ bias)`: a dot of `x`'s last axis with a tied rank-2 weight `w`, stored as
    `(in, out)`, or `(out, in)` when `transposed`. `equations`: the indices of the equations it
    spans (the dot, a transpose back to tokens-first, the bias's broadcasts and add)."""

    x: Any
    w: Any
    transposed: bool
    bias: Any | None
    out: Any
    equations: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """`(in, out)`: the weight's shape as the kernel takes it."""
        shape = tuple(self.w.aval.shape)
        return shape[::-1] if self.transposed else shape


class Activation(NamedTuple):
    """The hidden function between the input projections and the down projection.

    `output = f(input)` by the elementwise `equations` (which the kernel re-evaluates on its
    tiles); `name` is what reports call it. In a gated site `input` is the gate's pre-activation
    and the hidden value is `output * up`, one `mul`. `spans`: the indices of every equation
    between the projections, that `mul` included.
    """

    input: Any
    output: Any
    equations: tuple[Any, ...]
    name: str
    spans: tuple[int, ...]


class FFNSite(NamedTuple):
    """One matched FFN, `down(activation(ins))`: `ins` is `(W1,)`, or `(gate, up)` when gated."""

    ins: tuple[Linear, ...]
    activation: Activation
    down: Linear

    @property
    def gated(self) -> bool:
        return len(self.ins) == 2

    @property
    def equations(self) -> frozenset[int]:
        """The indices of the equations the site replaces."""
        spans = (*(i for p in self.ins for i in p.equations), *self.activation.spans)
        return frozenset((*spans, *self.down.equations))

    @property
    def last(self) -> int:
        """The index of its last equation, where its output is computed."""
        return max(self.equations)


class _Region(NamedTuple):
    """An elementwise region (equation indices, in order) whose value `value` the dot at
    equation `down` consumes."""

    equations: tuple[int, ...]
    value: Any
    down: int


class _GateSplit(NamedTuple):
    """A gated region `act(z_gate) * z_up`: the gate's pre-activation, its activation value and
    the gate's equations (the region without its final `mul`)."""

    z_gate: Any
    gate: Any
    equations: tuple[int, ...]


class _Graph:
    """A jaxpr's equations, who reads each value and who produces it, and its tied values."""

    def __init__(self, jaxpr: Any, tied: set[Any]):
        self.eqns = jaxpr.eqns
        self.tied = tied
        self.uses: dict[Any, list[int]] = {}
        """Each value's reads: equation indices in order, `-1` for an output of the jaxpr."""
        self.dots: dict[Any, list[int]] = {}
        """The `dot_general` equations reading each value, in order."""
        self.producer: dict[Any, int] = {}
        for index, eqn in enumerate(self.eqns):
            operands = [v for v in eqn.invars if not _compat.is_literal(v)]
            for v in operands:  # once per operand: `x * x` is two uses of `x`
                self.uses.setdefault(v, []).append(index)
            if eqn.primitive is _primitives.dot_general_p:
                for v in dict.fromkeys(operands):
                    self.dots.setdefault(v, []).append(index)
            self.producer.update((v, index) for v in eqn.outvars)
        for v in jaxpr.outvars:
            if not _compat.is_literal(v):
                self.uses.setdefault(v, []).append(-1)

    def only_use(self, var: Any) -> int | None:
        uses = self.uses.get(var, [])
        return uses[0] if len(uses) == 1 and uses[0] >= 0 else None


def find_ffn_sites(jaxpr: Any, tied: set[Any]) -> dict[int, FFNSite]:
    """The FFN sites at the top level of `jaxpr` whose weights are in `tied`, by last equation."""
    if not tied:
        return {}
    graph = _Graph(jaxpr, tied)
    sites: dict[int, FFNSite] = {}
    taken: set[int] = set()
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is not _primitives.dot_general_p or index in taken:
            continue
        site = _site_at(graph, index)
        if site is not None and not (site.equations & taken):
            sites[site.last] = site
            taken |= site.equations
    return sites


def _site_at(graph: _Graph, index: int) -> FFNSite | None:
    """The site whose first input projection is the dot at equation `index`, if any."""
    first = _linear(graph, index)
    if first is None:
        return None
    region = _region(graph, [first.out], max(first.equations))
    if region is not None:
        return _plain_site(graph, first, region)
    return _gated_site(graph, first, index)


def _plain_site(graph: _Graph, first: Linear, region: _Region) -> FFNSite | None:
    """`act(x @ W1 (+ b1)) @ W2 (+ b2)`, the activation being `region`."""
    eqns = tuple(graph.eqns[i] for i in region.equations)
    activation = Activation(first.out, region.value, eqns, _name(eqns), region.equations)
    return _with_down(graph, (first,), activation, region)


def _gated_site(graph: _Graph, first: Linear, index: int) -> FFNSite | None:
    """`(act(x @ Wg (+ bg)) * (x @ Wu (+ bu))) @ W2 (+ b2)`, `first` being either projection: the
    other is a dot of the same `x` (found among the dots reading `x`)."""
    for other in graph.dots.get(first.x, []):
        if other == index or other in first.equations:
            continue
        second = _linear(graph, other, first.x)
        if second is None or second.w is first.w or second.w.aval.shape != first.w.aval.shape:
            continue
        if second.transposed != first.transposed or set(second.equations) & set(first.equations):
            continue
        region = _region(graph, [first.out, second.out], max(first.equations), second.equations)
        if region is None:
            continue
        split = _gate_split(graph, region, first.out, second.out)
        if split is None:
            continue
        gate, up = (first, second) if split.z_gate is first.out else (second, first)
        eqns = tuple(graph.eqns[i] for i in split.equations)
        activation = Activation(split.z_gate, split.gate, eqns, _name(eqns), region.equations)
        return _with_down(graph, (gate, up), activation, region)
    return None


def _with_down(
    graph: _Graph, ins: tuple[Linear, ...], activation: Activation, region: _Region
) -> FFNSite | None:
    """The site, with the down projection of the region's value, if it maps back to `x`'s type."""
    down = _linear(graph, region.down, region.value)
    if down is None:
        return None
    x = ins[0].x
    if down.out.aval.shape[:-1] != x.aval.shape[:-1] or down.out.aval.dtype != x.aval.dtype:
        return None
    return FFNSite(ins, activation, down)


def _name(eqns: Sequence[Any]) -> str:
    """The activation's name in reports: a known `jax.nn` activation's, or what it is."""
    for eqn in eqns:
        known = _compat.jax_nn_custom_jvp_name(eqn)
        if known in KNOWN_CUSTOM_ACTIVATIONS:
            return known
    return "traced elementwise" if eqns else "identity"


def _linear(graph: _Graph, index: int, x_var: Any | None = None) -> Linear | None:
    """`x @ W (+ b)` at equation `index`, reading `x_var` if given."""
    dot = _dot(graph, index, x_var)
    return None if dot is None else _with_bias(graph, dot)


def _rank(atom: Any) -> int:
    return len(atom.aval.shape)


def _dot(graph: _Graph, index: int, x_var: Any | None) -> Linear | None:
    """A dot of `x` (`x_var` if given) with a tied rank-2 weight, without a bias."""
    eqn = graph.eqns[index]
    if eqn.primitive is not _primitives.dot_general_p:
        return None
    (contract, batch) = eqn.params["dimension_numbers"]
    if tuple(batch[0]) or tuple(batch[1]):
        return None
    for w_pos in (1, 0):
        w, x = eqn.invars[w_pos], eqn.invars[1 - w_pos]
        if _compat.is_literal(w) or w not in graph.tied or _rank(w) != 2:
            continue
        if x_var is not None and x is not x_var:
            continue
        x_contract, w_contract = tuple(contract[1 - w_pos]), tuple(contract[w_pos])
        if x_contract != (_rank(x) - 1,) or len(w_contract) != 1:
            continue
        if eqn.params.get("preferred_element_type") not in (None, x.aval.dtype):
            continue
        out, spans = eqn.outvars[0], (index,)
        if w_pos == 0 and _rank(x) > 1:  # (hidden, tokens...): must be transposed back
            back = graph.only_use(out)
            expected = (*range(1, _rank(x)), 0)
            if back is None or graph.eqns[back].primitive is not _primitives.transpose_p:
                continue
            if tuple(graph.eqns[back].params["permutation"]) != expected:
                continue
            out, spans = graph.eqns[back].outvars[0], (index, back)
        return Linear(x, w, w_contract == (1,), None, out, spans)
    return None


def _with_bias(graph: _Graph, linear: Linear) -> Linear:
    """`linear` with the `+ b` that follows it (a vector broadcast along the last axis), if any."""
    value = linear.out
    add = graph.only_use(value)
    if add is None or graph.eqns[add].primitive is not _primitives.add_p:
        return linear
    other = [v for v in graph.eqns[add].invars if v is not value]
    if len(other) != 1 or _compat.is_literal(other[0]):
        return linear
    (b,) = other
    width, out = value.aval.shape[-1], graph.eqns[add].outvars[0]
    if b.aval.shape == (width,) and _rank(value) == 1:
        return linear._replace(bias=b, out=out, equations=(*linear.equations, add))
    # b is the vector reshaped to (1, ..., 1, width) by one or more broadcasts/reshapes (vmap
    # adds one): walk back through them to the vector.
    chain: list[int] = []
    user = add
    while True:
        source = graph.producer.get(b)
        if source is None or graph.only_use(b) != user:
            return linear
        step = graph.eqns[source]
        if step.primitive not in (_primitives.broadcast_in_dim_p, _primitives.reshape_p):
            return linear
        if any(d != 1 for d in b.aval.shape[:-1]) or b.aval.shape[-1:] != (width,):
            return linear
        if step.primitive is _primitives.broadcast_in_dim_p and (
            step.params["broadcast_dimensions"][-1:] != (_rank(b) - 1,)
        ):
            return linear
        chain.append(source)
        b, user = step.invars[0], source
        if _compat.is_literal(b):
            return linear
        if b.aval.shape == (width,):
            spans = (*linear.equations, *chain, add)
            return linear._replace(bias=b, out=out, equations=spans)


def _region(
    graph: _Graph, starts: Sequence[Any], after: int, skip: Sequence[int] = ()
) -> _Region | None:
    """The elementwise region from `starts` up to the dot that consumes it, followed through the
    equations (after equation `after`) that read its values, in jaxpr order."""
    inside, region = set(starts), []
    shape = starts[0].aval.shape
    pending = [i for v in starts for i in graph.uses.get(v, []) if i > after]
    heapq.heapify(pending)
    visited: set[int] = set()
    while pending:
        index = heapq.heappop(pending)
        if index in visited or index in skip:
            continue
        visited.add(index)
        eqn = graph.eqns[index]
        touched = [v for v in eqn.invars if not _compat.is_literal(v) and v in inside]
        if eqn.primitive is _primitives.dot_general_p:
            if len(touched) != 1:
                return None
            (value,) = touched
            spans = set(region)
            for var in inside:
                if any(
                    u not in spans and not (var is value and u == index)
                    for u in graph.uses.get(var, [])
                ):
                    return None
            return _Region(tuple(region), value, index)
        others = [v for v in eqn.invars if not _compat.is_literal(v) and v not in inside]
        if others or not is_elementwise(eqn):
            return None
        if any(o.aval.shape != shape for o in eqn.outvars):
            return None
        region.append(index)
        inside.update(eqn.outvars)
        for out in eqn.outvars:
            for use in graph.uses.get(out, []):
                if use > after:
                    heapq.heappush(pending, use)
    return None


def _gate_split(graph: _Graph, region: _Region, z0: Any, z1: Any) -> _GateSplit | None:
    """Splits a gated region `act(z_g) * z_u` into the gate's part and the final `mul`."""
    spans = region.equations
    if not spans or graph.producer.get(region.value) != spans[-1]:
        return None
    mul = graph.eqns[spans[-1]]
    if mul.primitive is not _primitives.mul_p or any(_compat.is_literal(v) for v in mul.invars):
        return None
    depends: dict[Any, set[Any]] = {z0: {z0}, z1: {z1}}
    for i in spans[:-1]:
        eqn = graph.eqns[i]
        deps = set().union(*(depends[v] for v in eqn.invars if not _compat.is_literal(v)))
        depends.update({o: deps for o in eqn.outvars})
    p, q = mul.invars
    for gate_side, up_side in ((p, q), (q, p)):
        for z_g, z_u in ((z0, z1), (z1, z0)):
            if up_side is z_u and depends.get(gate_side) == {z_g}:
                return _GateSplit(z_g, gate_side, spans[:-1])
    return None


def is_elementwise(eqn: Any) -> bool:
    """An elementwise primitive, a `jit` of an elementwise jaxpr, or a known `jax.nn`
    activation (a `custom_jvp`)."""
    if eqn.primitive in _compat.ELEMENTWISE:
        return True
    if eqn.primitive in _compat.CALL_PRIMITIVES:
        return _is_elementwise_jaxpr(_compat.call_jaxpr(eqn)[0])
    return _compat.jax_nn_custom_jvp_name(eqn) in KNOWN_CUSTOM_ACTIVATIONS


def _is_elementwise_jaxpr(jaxpr: Any) -> bool:
    """Every equation is elementwise and reads only the inputs' descendants (or literals).

    A closed-over array (a constvar, e.g. a per-unit scale) is not elementwise in the inputs: the
    kernel applies the activation to `(block_m, block_h)` tiles, where such an array would not
    line up with the tile.
    """
    derived = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        operands = [v for v in eqn.invars if not _compat.is_literal(v)]
        if not is_elementwise(eqn) or any(v not in derived for v in operands):
            return False
        if any(o.aval.shape != operands[0].aval.shape for o in eqn.outvars if operands):
            return False
        derived.update(eqn.outvars)
    return all(_compat.is_literal(v) or v in derived for v in jaxpr.outvars)


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

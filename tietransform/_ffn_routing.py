"""Serving FFNs on tied weights with the fused kernels: deciding, reporting, serving.

`_ffn_match.find_ffn_sites` finds the sites (`act(x @ W1 + b1) @ W2 + b2`, plain or gated, on
tied weights). Each site found is decided by the kernels' own support rules
(`kernels.ffn_support`: dtype, shapes, the backend that will run it). A site the kernel serves is
replaced by `kernels.ffn(x, W1, b1, W2, b2, activation=act)` (or `kernels.gated_ffn`), the
activation re-evaluated from the traced equations; any other site is left as traced (XLA),
silently in the default mode and with a one-time warning when the kernel was asked for. Either
way the site is reported to `ffn_routing_report`.
"""

import contextlib
import contextvars
import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.extend.core import primitives as _primitives

from . import _compat, _interpret
from ._errors import warn_once
from ._ffn_match import KNOWN_CUSTOM_ACTIVATIONS, FFNSite, Linear


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
    options: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments for the kernels beyond `implementation` (`backend`, `config`, ...)."""


FFN_OPTIONS = frozenset({"backend", "config", "block_m", "block_h"})
"""The keyword arguments of `kernels.ffn` that `tie(..., ffn_options=...)` passes through."""


def routing_for(
    fuse_ffn: bool | Implementation | None, options: Mapping[str, Any] | None = None
) -> Routing | None:
    """The routing `tie(..., fuse_ffn=...)` asks for.

    `None`: the compiled kernels where a Pallas backend exists (GPU, TPU), silently leaving what
    they cannot serve to XLA; off on CPU. `True`: on everywhere (interpret mode on CPU), warning
    once per site the kernel cannot serve. `False`: off. A string is an implementation of
    `kernels.ffn`, as explicit as `True`. `options` are further keyword arguments of the kernels
    (`backend`, `config`, `block_m`, `block_h`), for every site.
    """
    routing = _routing_for(fuse_ffn)
    if not options:
        return routing
    unknown = sorted(set(options) - FFN_OPTIONS)
    if unknown:
        raise ValueError(
            f"tie(ffn_options=...) got {unknown}, which are not options of kernels.ffn; use "
            f"{sorted(FFN_OPTIONS)}."
        )
    if routing is None:
        raise ValueError(
            "tie(ffn_options=...) configures the fused FFN kernel, which this call does not use: "
            "pass fuse_ffn=True (or an implementation name) too."
        )
    return dataclasses.replace(routing, options=tuple(sorted(options.items())))


def _routing_for(fuse_ffn: bool | Implementation | None) -> Routing | None:
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


def describe(site: FFNSite) -> str:
    """`dtype[tokens..., d] -> hidden -> d_out`, prefixed `gated ` for a gated FFN."""
    kind = "gated FFN" if site.gated else "FFN"
    return (
        f"{kind} {site.ins[0].x.aval.str_short()} -> {site.ins[0].shape[1]} -> {site.down.shape[1]}"
    )


def decide(site: FFNSite, routing: Routing) -> RoutedFFN:
    """What serves `site` under `routing`, by the kernels' own support rules
    (`kernels.ffn_support`); reported (and, if the kernel was asked for, warned about once)."""
    from .kernels import ffn_support

    def weight(linear: Linear) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(linear.shape, linear.w.aval.dtype)

    support = ffn_support(
        site.ins[0].x.aval,
        tuple(weight(linear) for linear in site.ins),
        weight(site.down),
        biases=tuple(p.bias.aval for p in (*site.ins, site.down) if p.bias is not None),
        implementation=routing.implementation,
        **{k: v for k, v in routing.options if k in ("backend", "config")},
    )
    kernel = "kernels.gated_ffn" if site.gated else "kernels.ffn"
    if support.reason is None:
        decision = RoutedFFN(
            shape=describe(site),
            activation=site.activation.name,
            implementation=support.implementation,
            served_by=f"{kernel}[{support.implementation}]",
        )
    else:
        decision = RoutedFFN(
            shape=describe(site),
            activation=site.activation.name,
            implementation=None,
            served_by="XLA",
            reason=support.reason,
        )
        message = (
            f"tie(fuse_ffn=...) routes FFNs to kernels.ffn (implementation "
            f"{routing.implementation!r}), but {decision.shape}, activation "
            f"{decision.activation}, is left to XLA: {support.reason}."
        )
        if routing.warns:
            warn_once(message)
    report = _report.get()
    if report is not None:
        report.append(decision)
    return decision


def left_to_xla(site: FFNSite, reason: str) -> RoutedFFN:
    """A site no kernel serves, for a reason of tie's own (e.g. a relaxed tie); reported."""
    decision = RoutedFFN(
        shape=describe(site), activation=site.activation.name, implementation=None, reason=reason
    )
    report = _report.get()
    if report is not None:
        report.append(decision)
    return decision


def _known_activation(eqn: Any, invals: list[Any], context: Any) -> list[Any]:
    """A `custom_jvp` activation of `jax.nn` (`_ffn_match.KNOWN_CUSTOM_ACTIVATIONS`)."""
    return [KNOWN_CUSTOM_ACTIVATIONS[_compat.jax_nn_custom_jvp_name(eqn) or ""](*invals)]


_ACTIVATION_RULES = _interpret.Rules(
    {_primitives.custom_jvp_call_p: _known_activation},
    default=_interpret.bind_plain,
    inline_calls=True,
)
"""A site's activation, evaluated in the kernel's body: its equations are elementwise (or calls
of such, or known activations), bound without the context of the trace they came from, which
may hold a mesh the kernel's per-shard body refuses."""


def serve(site: FFNSite, read: Callable[[Any], Any], decision: RoutedFFN, routing: Routing) -> Any:
    """Computes the site's output with `kernels.ffn` or `kernels.gated_ffn`."""
    from .kernels import ffn, gated_ffn

    act = site.activation

    def activation(z: jax.Array) -> jax.Array:
        env = {act.input: z.astype(act.input.aval.dtype)}
        _interpret.run(act.equations, env, _ACTIVATION_RULES)
        return env[act.output].astype(z.dtype)

    def weight(linear: Linear) -> jax.Array:
        return jnp.transpose(read(linear.w)) if linear.transposed else read(linear.w)

    def bias(linear: Linear) -> jax.Array | None:
        return None if linear.bias is None else read(linear.bias)

    x, down = read(site.ins[0].x), site.down
    implementation: Any = decision.implementation  # one that `ffn_support` chose
    if site.gated:
        gate, up = site.ins
        return gated_ffn(
            x,
            weight(gate),
            weight(up),
            weight(down),
            bg=bias(gate),
            bu=bias(up),
            b2=bias(down),
            activation=activation,
            implementation=implementation,
            **dict(routing.options),
        )
    (first,) = site.ins
    return ffn(
        x,
        weight(first),
        bias(first),
        weight(down),
        bias(down),
        activation=activation,
        implementation=implementation,
        **dict(routing.options),
    )

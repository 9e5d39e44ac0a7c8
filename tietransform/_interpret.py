"""The one jaxpr evaluator: each equation is computed by the rule its primitive has, if any, and
otherwise bound as traced.

Rules are keyed on primitive objects (from `jax.extend.core.primitives`), never names, and each
equation is looked up once, in one table (as JAX's checkify and Oryx's harvest do). Its users:

- `_rewrite.evaluate` (stacked ties, FFN routing): a rule per higher-order primitive and per
  elementwise and slice-read primitive; the default materialises a stacked read, with a warning.
- `_ffn_routing.serve` (a site's activation, evaluated on the kernel's tiles): known `jax.nn`
  activations; calls inlined; the default binds without the trace-time context.
- `kernels._compat.eval_with_plain_adds`: `add_any` bound as `add`; calls inlined.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import _compat


Rule = Callable[[Any, list[Any], Any], list[Any]]
"""`rule(eqn, invals, context) -> outvals`, `context` being what the caller gave `evaluate`."""


def bind(eqn: Any, invals: list[Any], context: Any = None) -> list[Any]:
    """Binds `eqn` as traced, with its source information and context (`jax.core.eval_jaxpr`)."""
    del context
    return _compat.bind_equation(eqn, invals)


def bind_plain(eqn: Any, invals: list[Any], context: Any = None) -> list[Any]:
    """Binds `eqn` without re-entering its trace-time context (`_compat.bind_elementwise`)."""
    del context
    return _compat.bind_elementwise(eqn, invals)


class Rules(dict[Any, Rule]):
    """Rules by primitive object; `default` computes every other equation.

    With `inline_calls`, each call primitive (`jit`, `closed_call`, ...) evaluates its inner
    jaxpr with these same rules, so that they apply inside too.
    """

    def __init__(
        self, rules: Mapping[Any, Rule] = {}, default: Rule = bind, *, inline_calls: bool = False
    ):
        super().__init__(rules)
        self.default = default
        if inline_calls:
            self.update(dict.fromkeys(_compat.CALL_PRIMITIVES, self._inline))

    def __missing__(self, primitive: Any) -> Rule:
        return self.default

    def _inline(self, eqn: Any, invals: list[Any], context: Any) -> list[Any]:
        inner, consts = _compat.call_jaxpr(eqn)
        return evaluate(inner, consts, invals, self, context)


def evaluate(
    jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], rules: Rules, context: Any = None
) -> list[Any]:
    """Evaluates the open `jaxpr` on `args` with `rules`; returns its outputs."""
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))
    run(jaxpr.eqns, env, rules, context)
    return [read(env, v) for v in jaxpr.outvars]


def run(eqns: Iterable[Any], env: dict[Any, Any], rules: Rules, context: Any = None) -> None:
    """Evaluates `eqns` in order, reading their inputs from `env` and writing their outputs."""
    for eqn in eqns:
        outs = rules[eqn.primitive](eqn, [read(env, v) for v in eqn.invars], context)
        env.update(zip(eqn.outvars, outs, strict=True))


def read(env: Mapping[Any, Any], atom: Any) -> Any:
    """The value of a jaxpr atom: a `Literal`'s own, a variable's from `env`."""
    return atom.val if _compat.is_literal(atom) else env[atom]

"""The one jaxpr evaluator (`tietransform._interpret`): rules keyed on primitive objects."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives

from tietransform import _compat, _interpret


def _loss_and_grad(x):
    # `jax.nn.gelu` is a `jit` call; its gradient sums cotangents with `add_any`.
    return jax.value_and_grad(lambda x: jnp.sum(jax.nn.gelu(x) * x))(x)


def _traced(fn, x):
    closed = jax.make_jaxpr(fn)(x)
    jaxpr, consts = _compat.split_jaxpr(closed)
    return jaxpr, consts


def test_equations_without_a_rule_evaluate_as_traced():
    x = jnp.linspace(-2.0, 2.0, 6)
    jaxpr, consts = _traced(_loss_and_grad, x)
    got = _interpret.evaluate(jaxpr, consts, [x], _interpret.Rules())
    for a, b in zip(got, _loss_and_grad(x), strict=True):
        assert bool(jnp.array_equal(a, b))


def test_a_rule_replaces_its_primitive_inside_inlined_calls_too():
    plain_adds = _interpret.Rules(
        {primitives.add_jaxvals_p: lambda eqn, invals, context: [lax.add(*invals)]},
        inline_calls=True,
    )
    x = jnp.linspace(-2.0, 2.0, 6)
    jaxpr, consts = _traced(_loss_and_grad, x)
    assert "add_any" in str(jaxpr)
    rewritten = jax.make_jaxpr(lambda x: _interpret.evaluate(jaxpr, consts, [x], plain_adds))(x)
    assert "add_any" not in str(rewritten)

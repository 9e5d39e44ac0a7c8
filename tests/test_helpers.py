"""The suite's own yardsticks: `rounding_depth`, which sizes the property tests' tolerances."""

import jax
import jax.numpy as jnp

from tests.helpers import rounding_depth


def _depth(f, *args) -> int:
    return rounding_depth(jax.make_jaxpr(f)(*args))


def test_rounding_depth_counts_each_elementwise_equation_once():
    assert _depth(lambda x: jnp.tanh(jnp.sin(x) * 2.0), jnp.ones(3)) == 3


def test_rounding_depth_counts_two_roundings_per_contracted_term_of_a_dot():
    assert _depth(lambda w, x: w @ x, jnp.ones((3, 5)), jnp.ones(5)) == 10


def test_rounding_depth_counts_one_rounding_per_reduced_term():
    assert _depth(lambda x: jnp.sum(x, axis=1), jnp.ones((4, 6))) == 6


def test_rounding_depth_counts_a_scan_body_once_per_iteration():
    def body(h, _):
        return jnp.tanh(h), None

    one = _depth(lambda h: body(h, None)[0], jnp.ones(2))
    scanned = _depth(lambda h: jax.lax.scan(body, h, None, length=7)[0], jnp.ones(2))
    assert scanned == 1 + 7 * one


def test_rounding_depth_counts_the_deepest_branch_of_a_cond_not_their_sum():
    def deep(x):
        return jnp.tanh(jnp.sin(jnp.cos(x)))

    def with_branches(a, b):
        return lambda p, x: jax.lax.cond(p, a, b, x)

    args = (True, jnp.ones(2))
    assert _depth(with_branches(deep, jnp.tanh), *args) == _depth(with_branches(deep, deep), *args)
    assert _depth(with_branches(deep, jnp.tanh), *args) == (
        _depth(with_branches(jnp.tanh, jnp.tanh), *args) + 2
    )

"""Property tests: random pytrees, random groups (patterns, paths, where, views, stacks), random
shapes and dtypes. Every tied result is compared with the untied function at the materialised
model."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

import tietransform as tt
from tests.helpers import assert_trees_close, hlo_parameter_count
from tietransform.testing import check_tied
from tietransform.testing.strategies import TiedProblem, tied_problems


def _tied(problem: TiedProblem):
    packed = tt.pack(problem.params, problem.spec)
    return packed, tt.tie(problem.fn, problem.spec)


def _untied(problem: TiedProblem):
    return lambda packed, *args: problem.fn(tt.unpack(packed, problem.spec), *args)


@given(tied_problems(dtypes=(jnp.float32, jnp.bfloat16)))
def test_tied_values_and_gradients_match_the_untied_reference(problem):
    check_tied(problem.fn, problem.spec, problem.params, *problem.args)


@given(tied_problems())
@settings(max_examples=6)
def test_tied_gradients_match_finite_differences_in_float64(problem):
    with jax.enable_x64(True):
        problem = _as_f64(problem)
        packed, tied = _tied(problem)
        check_grads(
            lambda p: tied(p, *problem.args),
            (packed,),
            order=1,
            modes=["rev"],
            atol=1e-7,
            rtol=1e-7,
        )


def _as_f64(problem: TiedProblem) -> TiedProblem:
    to_f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
    params = jax.tree.map(to_f64, problem.params)
    return TiedProblem(
        params, problem.spec, problem.fn, jax.tree.map(to_f64, problem.args), problem.description
    )


@given(tied_problems())
def test_tie_commutes_with_jit(problem):
    packed, tied = _tied(problem)
    assert_trees_close(
        jax.jit(tied)(packed, *problem.args), jax.jit(_untied(problem))(packed, *problem.args)
    )
    grad_tied = jax.jit(jax.grad(tied))(packed, *problem.args)
    grad_untied = jax.jit(jax.grad(_untied(problem)))(packed, *problem.args)
    assert_trees_close(grad_tied, grad_untied, summands=5)


@given(tied_problems(), st.integers(1, 3))
def test_tie_commutes_with_vmap(problem, batch):
    packed, tied = _tied(problem)
    xs = jnp.stack([problem.args[0] + i for i in range(batch)])
    assert_trees_close(
        jax.vmap(tied, (None, 0))(packed, xs), jax.vmap(_untied(problem), (None, 0))(packed, xs)
    )


@given(tied_problems())
@settings(max_examples=6)
def test_tie_commutes_with_scan_and_checkpoint(problem):
    packed, tied = _tied(problem)

    def run(f):
        def step(p, _):
            value, grads = jax.value_and_grad(jax.checkpoint(f))(p, *problem.args)
            return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads), value

        return jax.lax.scan(step, packed, length=2)

    assert_trees_close(run(tied), run(_untied(problem)), summands=5)


@given(tied_problems(views=False, stacks=False))
@settings(max_examples=6)
def test_compiled_program_has_one_parameter_per_buffer(problem):
    packed, tied = _tied(problem)
    buffers = len(jax.tree.leaves(eqx.filter(packed, eqx.is_array)))
    compiled = jax.jit(tied).lower(packed, *problem.args).compile().as_text()
    assert hlo_parameter_count(compiled) == buffers + len(problem.args)
    full = tt.unpack(packed, problem.spec)
    untied = jax.jit(problem.fn).lower(full, *problem.args).compile().as_text()
    assert (
        hlo_parameter_count(untied)
        == len(jax.tree.leaves(full)) + len(problem.args)
        > buffers + len(problem.args)
    )

"""Property tests over models drawn the way users write them (see tests/strategies.py): several
groups, views and stacks at once over Equinox modules or dicts, read through matmuls, `vmap`,
`cond`, `scan` and `checkpoint`, under random compositions of `jit`/`grad`/`vmap`. Every tied
result is compared with the untied function at the model materialised by the test's own
semantics (not by `tt.unpack`), and every gradient with the untied gradients summed over members.

Examples are costly mostly through XLA compilation (each drawn function is new), so the number of
examples comes from the hypothesis profile (`ci` bounded, `dev` many); the costlier secondary
properties run half the profile's examples.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from jax.test_util import check_grads

import tietransform as tt
from tests.helpers import assert_trees_close, hlo_parameter_count, tolerance
from tests.strategies import WRAPPERS, Problem, get, problems, transformed


_HALF = settings(max_examples=max(1, settings.default.max_examples // 2))


def _buffer(tree: object, path: tuple) -> jax.Array:
    node = get(tree, path)
    return node.data if isinstance(node, tt.StackedLeaf) else node


def _assert_grads_match(problem: Problem, packed_grads: object, full_grads: object) -> None:
    """Each packed buffer's gradient equals the sum of its members' untied gradients.

    Normwise: max |got - expected| <= tolerance(float32, members) * (sum of the members'
    max |gradient|). Both sides add the same float32 terms, in different orders, once per member
    (JAX's autodiff accumulates a buffer's reads; the reference sums members in float64), so the
    difference is a reassociation error of `members` float32 additions.
    """
    problems = []
    for path, (expected, scale, members) in problem.expected_grads(full_grads).items():
        got = np.asarray(_buffer(packed_grads, path), np.float64)
        assert got.shape == expected.shape, (path, got.shape, expected.shape)
        error = float(np.max(np.abs(got - expected), initial=0.0)) / max(scale, 1e-30)
        if not error <= tolerance(jnp.float32, members):
            problems.append(f"{path}: error {error:.3g} > {tolerance(jnp.float32, members):.3g}")
    assert not problems, "\n".join(problems)


@given(problems())
def test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members(problem):
    packed = tt.pack(problem.params, problem.spec)
    full = problem.materialise(problem.params)
    # "highest": an f32 matmul is f32 on every backend, so the tolerances below hold anywhere.
    with jax.default_matmul_precision("highest"):
        tied = transformed(tt.tie(problem.fn, problem.spec), problem.transforms)
        reference = transformed(problem.fn, problem.transforms)
        value, grads = jax.value_and_grad(tied)(packed, problem.x)
        expected_value, full_grads = jax.value_and_grad(reference)(full, problem.x)
    # The same float32 operations on the same values: equal up to XLA's reassociation.
    assert_trees_close(value, expected_value)
    _assert_grads_match(problem, grads, full_grads)


@given(problems(transforms=False))
def test_unpack_of_pack_is_the_model_with_members_replaced_by_their_canonical_values(problem):
    packed = tt.pack(problem.params, problem.spec)
    expected = problem.materialise(problem.params)
    got = tt.unpack(packed, problem.spec)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        # unpack applies the same view functions to the same arrays: equal to float32 rounding.
        np.testing.assert_allclose(a, b, rtol=tolerance(jnp.float32), atol=0)
    # One array per buffer: the members are gone, stacks keep their distinct slices.
    stored = sum(np.size(x) for x in jax.tree.leaves(packed))
    members = sum(int(np.prod(get(problem.params, t.member).shape)) for t in problem.ties)
    repeated = sum(
        (len(rows) - len(set(rows))) * int(np.prod(get(problem.params, path).shape[1:]))
        for path, rows in problem.stacks.items()
    )
    assert stored == sum(x.size for x in jax.tree.leaves(problem.params)) - members - repeated


@given(problems(transforms=False, wrappers=tuple(w for w in WRAPPERS if w != "cond")))
@_HALF
def test_tied_gradients_match_finite_differences_in_float64(problem):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), problem.params)
        packed = tt.pack(params, problem.spec)
        tied = tt.tie(problem.fn, problem.spec)
        x = jnp.asarray(np.asarray(problem.x, np.float64))
        # Central differences in float64 with step h = 1e-5, not check_grads' default 1e-3: with
        # 1e-3 the truncation error h^2 f'''/6 reached 2e-5 relative on a dev run (a smooth
        # 3-block tower; h = 1e-5 passes it). Now truncation ~ 2e-11 f''' and round-off
        # ~ eps64 / h ~ 2e-11, far below the 1e-5 tolerance.
        # One compiled program per example, rather than one per eager control-flow primitive.
        f = jax.jit(lambda p: tied(p, x))
        check_grads(f, (packed,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-5)


@given(problems(transforms=False))
@_HALF
def test_compiled_program_has_one_parameter_per_buffer(problem):
    packed = tt.pack(problem.params, problem.spec)
    # Zero-size arrays (the placeholders' layout records) hold no numbers: not buffers.
    buffers = sum(x.size > 0 for x in jax.tree.leaves(eqx.filter(packed, eqx.is_array)))
    compiled = jax.jit(tt.tie(problem.fn, problem.spec)).lower(packed, problem.x).compile()
    assert hlo_parameter_count(compiled.as_text()) == buffers + 1

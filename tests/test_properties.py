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
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

import tietransform as tt
from tests.helpers import assert_trees_close, hlo_parameter_count, rounding_depth, tolerance
from tests.strategies import WRAPPERS, Problem, get, problems, transformed


_HALF = settings(max_examples=max(1, settings.default.max_examples // 2))


def _buffer(tree: object, path: tuple) -> jax.Array:
    node = get(tree, path)
    return node.data if isinstance(node, tt.StackedLeaf) else node


def _assert_grads_match(
    problem: Problem, packed_grads: object, full_grads: object, params: object, depth: int
) -> None:
    """Each packed buffer's gradient equals the sum of its members' untied gradients.

    Normwise: max |got - expected| <= tolerance(dtype, members + depth) * (sum of the members'
    max |gradient|). The tied and untied programs compute the same real function but are compiled
    separately, so each rounding on a path (at most `depth`, see `rounding_depth`) may differ
    between them, and the buffer's gradient adds `members` terms in another order than the
    float64 reference sum. A wrong tie (a member dropped or counted twice, a view's pullback or a
    stack's slices wrong) is off by a member's whole gradient, orders of magnitude above this.
    """
    dtype = jax.tree.leaves(params)[0].dtype
    problems = []
    for path, (expected, scale, members) in problem.expected_grads(full_grads, params).items():
        got = np.asarray(_buffer(packed_grads, path), np.float64)
        assert got.shape == expected.shape, (path, got.shape, expected.shape)
        assert _buffer(packed_grads, path).dtype == dtype, (path, _buffer(packed_grads, path).dtype)
        error = float(np.max(np.abs(got - expected), initial=0.0)) / max(scale, 1e-300)
        bound = tolerance(dtype, members + depth)
        if not error <= bound:
            problems.append(f"{path}: error {error:.3g} > {bound:.3g} ({dtype}, depth {depth})")
    assert not problems, "\n".join(problems)


def _as(dtype: type, tree: object) -> object:
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)), tree)


@given(problems(), st.sampled_from([np.float32, np.float64]))
def test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members(problem, dtype):
    # float64 examples bound the difference by ~1e-13 (a float32 rounding slipped into the
    # rewrite would show); float32 ones run the dtype users train in.
    with jax.enable_x64(dtype == np.float64):
        params, x = _as(dtype, problem.params), _as(dtype, problem.x)
        packed = tt.pack(params, problem.spec)
        full = problem.materialise(params)
        # "highest": an f32 matmul is f32 on every backend, so the tolerances below hold anywhere.
        with jax.default_matmul_precision("highest"):
            tied = transformed(tt.tie(problem.fn, problem.spec), problem.transforms)
            reference = jax.value_and_grad(transformed(problem.fn, problem.transforms))
            value, grads = jax.value_and_grad(tied)(packed, x)
            expected_value, full_grads = reference(full, x)
            depth = rounding_depth(jax.make_jaxpr(reference)(full, x))
        assert value.dtype == dtype
        assert_trees_close(value, expected_value, summands=depth)
        _assert_grads_match(problem, grads, full_grads, params, depth)


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
        params, x = _as(np.float64, problem.params), _as(np.float64, problem.x)
        packed = tt.pack(params, problem.spec)
        tied = tt.tie(problem.fn, problem.spec)
        # Central differences in float64. check_grads steps along a standard normal tangent t
        # (|t| ~ sqrt(#params), 5-10 here), so its step is eps * |t|, and the truncation error
        # (eps |t|)^2 f''' / 6 grows with the model: at eps = 1e-3, then at 1e-5, dev runs drew
        # examples off by 2e-5 relative whose gradients equal the untied reference's to 1e-15
        # (differences along a unit direction converge as h^2 there). At eps = 1e-6 truncation is
        # 100x below the last of those, and round-off eps64 |f| / (eps |t|) ~ 1e-10 |f| stays far
        # below atol = rtol = 1e-5.
        # One compiled program per example, rather than one per eager control-flow primitive.
        f = jax.jit(lambda p: tied(p, x))
        check_grads(f, (packed,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@given(problems(transforms=False))
@_HALF
def test_compiled_program_has_one_parameter_per_buffer(problem):
    packed = tt.pack(problem.params, problem.spec)
    # Zero-size arrays (the placeholders' layout records) hold no numbers: not buffers.
    buffers = sum(x.size > 0 for x in jax.tree.leaves(eqx.filter(packed, eqx.is_array)))
    compiled = jax.jit(tt.tie(problem.fn, problem.spec)).lower(packed, problem.x).compile()
    assert hlo_parameter_count(compiled.as_text()) == buffers + 1

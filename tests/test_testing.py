"""tietransform.testing: the checks users run must fail on a wrong tie, and pass on a right one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import tietransform as tt
import tietransform._layout as layout
from tietransform.testing import TieCheckError, check_tied, tolerance
from tietransform.testing.strategies import tied_problems


SPEC = tt.TieSpec(g=["a", "b"])
PARAMS = {"a": jnp.array([0.3, -1.2, 2.0]), "b": jnp.zeros(3)}


def loss(p):
    return jnp.sum(jnp.sin(p["a"]) * jnp.cos(p["b"]))


def test_check_tied_passes_a_correct_tie():
    check_tied(loss, SPEC, PARAMS)


def test_check_tied_reports_a_member_whose_gradient_is_dropped(monkeypatch):
    original = layout.full_leaves

    def drop_member_gradients(plan, packed_layout, leaves, **reads):
        out = original(plan, packed_layout, leaves, **reads)
        for slot in packed_layout.slots:
            for reader in slot.readers:
                out[reader] = jax.lax.stop_gradient(out[reader])
        return out

    monkeypatch.setattr("tietransform._tie.full_leaves", drop_member_gradients)
    with pytest.raises(TieCheckError, match=r"  a \(f32\[3\], 2 member\(s\)\): gradient error"):
        check_tied(loss, SPEC, PARAMS)


def test_check_tied_reports_a_wrong_value(monkeypatch):
    original = layout.full_leaves

    def perturb(plan, packed_layout, leaves, **reads):
        out = original(plan, packed_layout, leaves, **reads)
        out[1] = out[1] * 1.001
        return out

    monkeypatch.setattr("tietransform._tie.full_leaves", perturb)
    with pytest.raises(TieCheckError, match="value"):
        check_tied(loss, SPEC, PARAMS)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (jnp.float64, 2 * 2 * 2.0**-52),
        (jnp.float32, 2 * 2 * 2.0**-23),
        (jnp.bfloat16, 2 * 2 * 2.0**-7),
    ],
)
def test_tolerance_is_derived_from_the_dtypes_epsilon(dtype, expected):
    assert tolerance(dtype) == pytest.approx(expected)
    assert tolerance(dtype, summands=3) == pytest.approx(2 * expected)


@given(tied_problems())
def test_strategy_problems_tie_at_least_two_members_that_the_function_reads(problem):
    packed = tt.pack(problem.params, problem.spec)
    placeholders = [
        x
        for x in jax.tree.leaves(packed, is_leaf=tt._placeholders.is_placeholder)
        if tt._placeholders.is_placeholder(x)
    ]
    assert placeholders
    full = tt.unpack(packed, problem.spec)
    grads = jax.grad(problem.fn)(full, *problem.args)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))

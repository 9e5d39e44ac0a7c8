"""Elementwise reads of a `tt.stack` (the casts of a mixed-precision loss) keep it stacked;
other first-order reads of the whole stack build it, and say so."""

import jax
import jax.numpy as jnp
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close


N, D, H = 8, 64, 256


def _stacked(getkey):
    params = {
        "w1": jax.random.normal(getkey(), (N, D, H)) / D**0.5,
        "w2": jax.random.normal(getkey(), (N, H, D)) / H**0.5,
    }
    return params, jax.random.normal(getkey(), (16, D))


def _loss(cast):
    def loss(p, x):
        if cast:  # the mixed-precision recipe: cast the master weights once, before the scan
            p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)

        def step(h, q):
            out = jnp.tanh(h.astype(q["w1"].dtype) @ q["w1"]) @ q["w2"]
            return h + out.astype(jnp.float32), None

        return jnp.mean(jax.lax.scan(step, x, p)[0] ** 2)

    return loss


def _grad_temp_bytes(fn, *args) -> int:
    compiled = jax.jit(jax.grad(fn)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_casting_a_stacked_tie_before_the_scan_does_not_build_the_stack(getkey):
    params, x = _stacked(getkey)
    spec = tt.TieSpec(ffn=tt.stack("*"))
    packed = tt.pack(params, spec)
    uncast = _grad_temp_bytes(tt.tie(_loss(False), spec), packed, x)
    cast = _grad_temp_bytes(tt.tie(_loss(True), spec), packed, x)
    # Building the cast stack would add an L-fold bf16 copy of both weights, N * 2*D*H * 2
    # bytes = 0.5 MiB, more than the uncast read's whole temp memory. Casting per slice adds at
    # most one slice of each weight in bf16 and its float32 cotangent, whatever N is.
    one_slice_each = 2 * D * H * (2 + 4)
    assert cast - uncast <= one_slice_each < N * 2 * D * H * 2, (cast, uncast)


def test_a_cast_stacked_tie_has_the_untied_value_and_gradient(getkey):
    params, x = _stacked(getkey)
    spec = tt.TieSpec(ffn=tt.stack("*"))
    packed = tt.pack(params, spec)
    tied = tt.tie(_loss(True), spec)
    untied = lambda p, x: _loss(True)(tt.unpack(p, spec), x)  # noqa: E731
    assert_trees_close(tied(packed, x), untied(packed, x))
    assert_trees_close(jax.grad(tied)(packed, x), jax.grad(untied)(packed, x))


def test_a_first_order_read_of_the_whole_stack_warns_that_it_builds_it(getkey):
    params, x = _stacked(getkey)
    spec = tt.TieSpec(ffn=tt.stack("*"))

    def loss(p, x):  # an einsum over the stacked axis needs every slice at once
        w1 = p["w1"].astype(jnp.bfloat16)
        slice_read = jnp.sum(p["w2"][0])  # one slice: a gather, no warning
        out = jnp.einsum("td,ldh->lth", x.astype(jnp.bfloat16), w1)
        return jnp.sum(out.astype(jnp.float32)) + slice_read

    with pytest.warns(tt.StackMaterialisedWarning, match="read by `dot_general`"):
        tt.tie(loss, spec)(tt.pack(params, spec), x)

"""The higher-order checklist: every higher-order primitive that reads tied parameters is either
rewritten by `tie` or warns that it materialises a stack, and in both cases gives the values and
gradients of the untied reference.

One parametrised case per primitive of the checklist in the style guide (`scan`, `cond`,
`while`, `closed_call`/`eval_jaxpr`, `custom_jvp`, `custom_vjp`, `shard_map`, `pallas_call`,
`remat`, `jit`). Each case reads a plain tie (`a`, `b`) and a stacked tie (`w`) inside the
primitive, as operands of it (never by closure).
"""

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

import tietransform as tt
from tests.helpers import assert_trees_close


LAYERS, WIDTH = 3, 4
SPEC = tt.TieSpec(plain=["a", "b"], layers=tt.stack("w"))


def _layers(w: jax.Array, x: jax.Array) -> jax.Array:
    """Applies every slice of the stack `w` `(L, d, d)` to `x` `(d,)` in a Python loop."""
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i])
    return x


def _mix(p: dict, x: jax.Array) -> jax.Array:
    return jnp.sin(x @ p["a"]) + jnp.cos(x @ p["b"])


def via_jit(p, x):
    return jax.jit(lambda p, x: _layers(p["w"], _mix(p, x)))(p, x)


def via_remat(p, x):
    return jax.checkpoint(lambda p, x: _layers(p["w"], _mix(p, x)))(p, x)


def via_scan(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w) + _mix(p, h), None

    return jax.lax.scan(layer, x, p["w"])[0]


def via_scan_const(p, x):
    """The stack as a scan *const*, indexed by the scanned layer number: built whole."""
    layers = jnp.arange(p["w"].shape[0])
    return jax.lax.scan(lambda h, i: (jnp.tanh(h @ p["w"][i]), None), _mix(p, x), layers)[0]


def via_cond(p, x):
    return jax.lax.cond(
        jnp.sum(x) > 0.0,
        lambda p, x: _layers(p["w"], _mix(p, x)),
        lambda p, x: _layers(p["w"], -_mix(p, x)),
        p,
        x,
    )


def via_while(p, x):
    # A traced trip count keeps it a `while` (a static one would lower to `scan`).
    steps = jnp.asarray(LAYERS, jnp.int32) + jnp.zeros((), jnp.int32) * jnp.sum(x).astype(jnp.int32)

    def body(i, h):
        return jnp.tanh(h @ jax.lax.dynamic_index_in_dim(p["w"], i, keepdims=False)) + _mix(p, h)

    return jax.lax.fori_loop(0, steps, body, x)


def _closed_call(fn: Callable, *args):
    """Binds the `closed_call` primitive (named `eval_jaxpr` from jax 0.12 on) on `fn`'s jaxpr."""
    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree.leaves(args)
    primitive = jax.extend.core.primitives.closed_call_p
    if primitive.name == "eval_jaxpr":  # jax 0.12: the primitive is public, under its new name.
        out = primitive.bind(*flat, call_jaxpr=closed)
    else:  # jax 0.10-0.11 stage `closed_call` through this private primitive.
        from jax._src.lax.eval_jaxpr import eval_jaxpr_p  # type: ignore[import-not-found]

        out = eval_jaxpr_p.bind(*flat, jaxpr=closed)
    return out[0]


def via_closed_call(p, x):
    return _closed_call(lambda p, x: _layers(p["w"], _mix(p, x)), p, x)


@jax.custom_jvp
def _custom_jvp_layers(w, h):
    return _layers(w, h)


@_custom_jvp_layers.defjvp
def _custom_jvp_layers_jvp(primals, tangents):
    return jax.jvp(_layers, primals, tangents)


def via_custom_jvp(p, x):
    return _custom_jvp_layers(p["w"], _mix(p, x))


@jax.custom_vjp
def _custom_vjp_layers(w, h):
    return _layers(w, h)


def _custom_vjp_fwd(w, h):
    return _layers(w, h), (w, h)


def _custom_vjp_bwd(residuals, ct):
    return jax.vjp(_layers, *residuals)[1](ct)


_custom_vjp_layers.defvjp(_custom_vjp_fwd, _custom_vjp_bwd)


def via_custom_vjp(p, x):
    return _custom_vjp_layers(p["w"], _mix(p, x))


def via_shard_map(p, x):
    mesh = jax.make_mesh((1,), ("i",), devices=jax.devices()[:1])
    fn = jax.shard_map(
        lambda p, x: _layers(p["w"], _mix(p, x)), mesh=mesh, in_specs=(P(), P()), out_specs=P()
    )
    return fn(p, x)


def _copy_kernel(w_ref, o_ref):
    o_ref[...] = w_ref[...]


def _pallas_copy(w):
    return pl.pallas_call(
        _copy_kernel, out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype), interpret=True
    )(w)


def via_pallas_call(p, x):
    return _layers(_pallas_copy(p["w"]), _mix(p, x))


# primitive -> (function reading the ties through it, whether a stacked read is rewritten)
CASES = {
    "jit": (via_jit, True),
    "remat": (via_remat, True),
    "scan": (via_scan, True),
    "scan const": (via_scan_const, False),
    "cond": (via_cond, False),
    "while": (via_while, False),
    "closed_call": (via_closed_call, True),
    "custom_jvp": (via_custom_jvp, False),
    "custom_vjp": (via_custom_vjp, False),
    "shard_map": (via_shard_map, False),
    "pallas_call": (via_pallas_call, False),
}
# JAX itself differentiates these in forward mode only (no transpose of a `pallas_call`, no
# reverse mode through a `while` with a traced trip count): they are checked with `jvp`.
FORWARD_ONLY = {"pallas_call", "while"}


@pytest.fixture
def params(getkey):
    a = jax.random.normal(getkey(), (WIDTH, WIDTH)) / WIDTH
    w0 = jax.random.normal(getkey(), (WIDTH, WIDTH)) / WIDTH
    return {"a": a, "b": a, "w": jnp.broadcast_to(w0, (LAYERS, WIDTH, WIDTH))}


@pytest.fixture
def x(getkey):
    return jax.random.normal(getkey(), (WIDTH,))


def _untied(fn):
    return lambda packed, x: fn(tt.unpack(packed, SPEC), x)


def _expectation(rewritten: bool):
    """No warning for a rewritten read (the suite turns warnings into errors); else the warning."""
    if rewritten:
        return contextlib.nullcontext()
    return pytest.warns(tt.StackMaterialisedWarning, match="does not rewrite")


@pytest.mark.parametrize("name", list(CASES))
def test_higher_order_primitive_is_rewritten_or_warns_and_matches_the_untied_reference(
    name, params, x, getkey
):
    fn, rewritten = CASES[name]
    packed = tt.pack(params, SPEC)
    tied = tt.tie(fn, SPEC)
    with jax.default_matmul_precision("highest"):
        reference = _untied(fn)(packed, x)
        with _expectation(rewritten):
            got = tied(packed, x)
        assert_trees_close(got, reference, summands=2 * LAYERS)
        if name in FORWARD_ONLY:
            tangent = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape), packed)
            ref_jvp = jax.jvp(lambda p: _untied(fn)(p, x), (packed,), (tangent,))
            with _expectation(rewritten):
                got_jvp = jax.jvp(lambda p: tied(p, x), (packed,), (tangent,))
            assert_trees_close(got_jvp, ref_jvp, summands=4 * LAYERS)
            return
        loss = lambda f: lambda p, x: jnp.sum(f(p, x) ** 2)  # noqa: E731
        ref_grad = jax.grad(loss(_untied(fn)))(packed, x)
        with _expectation(rewritten):
            got_grad = jax.jit(jax.grad(loss(tied)))(packed, x)
        assert_trees_close(got_grad, ref_grad, summands=4 * LAYERS)


def test_closed_call_is_inlined_without_the_audit_when_ffns_are_routed(params, x):
    """`tie(..., audit=False, fuse_ffn=True)` walks a `closed_call` (`eval_jaxpr` on jax 0.12)
    with the routing rules: inlined, no warning, values of the untied reference."""
    packed = tt.tie(via_closed_call, SPEC, audit=False, fuse_ffn=True)
    packed_params = tt.pack(params, SPEC)
    with jax.default_matmul_precision("highest"):
        got = packed(packed_params, x)
        reference = _untied(via_closed_call)(packed_params, x)
    assert_trees_close(got, reference, summands=2 * LAYERS)

"""A tied function returns the untied function's output pytree: the same structure, arrays where it
returns arrays (with their dtype and weak type), Python values where it returns Python values.

Constant outputs are the case to watch: an array that does not depend on the inputs is a jaxpr
`Literal`, whose value is a Python scalar or one of JAX's private scalar types, not an array.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt


SPEC = tt.TieSpec(g=["a", "b"])
STACK_SPEC = tt.TieSpec(s=tt.stack("w", [0, 2]))


def _params():
    return {"a": jnp.ones(3), "b": jnp.zeros(3), "c": jnp.arange(3.0)}


def _kind(x):
    """What a leaf is: an array's Python-visible type (`jax.Array`) and aval (dtype, shape, weak
    type: `~float32[]`), or any other value's type and value."""
    if isinstance(x, jax.Array):
        return ("array", str(jax.typeof(x)))
    return (type(x), x)


def _kinds(tree):
    """The structure of `tree` and the kind of each leaf (None, a pytree node, included)."""
    return jax.tree.structure(tree), jax.tree.map(_kind, jax.tree.leaves(tree))


CONSTANTS = {
    "bool array": lambda: jnp.array(False),
    "weak float array": lambda: jnp.asarray(2.0),
    "weak int array": lambda: jnp.asarray(3),
    "strong float32 array": lambda: jnp.asarray(2.0, jnp.float32),
    "strong int8 array": lambda: jnp.asarray(3, jnp.int8),
    "bfloat16 array": lambda: jnp.asarray(2.0, jnp.bfloat16),
    "complex array": lambda: jnp.asarray(1 + 2j),
    "filled vector": lambda: jnp.zeros(2),
    "python float": lambda: 2.0,
    "python int": lambda: 3,
    "python bool": lambda: True,
    "none": lambda: None,
    "string": lambda: "train",
    "nested pytree": lambda: {"flag": jnp.array(True), "name": ("x", None), "n": jnp.asarray(1)},
}


@pytest.mark.parametrize("make", CONSTANTS.values(), ids=CONSTANTS.keys())
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_constant_output_keeps_the_untied_type(make, jit):
    def fn(p):
        return {"loss": (p["a"] * p["b"]).sum(), "constant": make()}

    tied = tt.tie(fn, SPEC)
    if jit:
        tied, fn = eqx.filter_jit(tied), eqx.filter_jit(fn)
    packed = tt.pack(_params(), SPEC)
    got, expected = tied(packed), fn(tt.unpack(packed, SPEC))
    assert _kinds(got) == _kinds(expected)
    assert bool(eqx.tree_equal(got, expected))  # the same values too (exactly: constants)


def test_packed_params_returned_as_output_are_the_full_params():
    def fn(p):
        return p, p["b"]

    packed = tt.pack(_params(), SPEC)
    out = tt.tie(fn, SPEC)(packed)
    expected = fn(tt.unpack(packed, SPEC))
    assert _kinds(out) == _kinds(expected)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), out, expected)))


def test_stacked_member_returned_as_output_is_its_full_stack():
    params = {"w": jnp.arange(12.0).reshape(3, 4)}
    packed = tt.pack(params, STACK_SPEC)
    out = tt.tie(lambda p: p["w"], STACK_SPEC)(packed)
    expected = tt.unpack(packed, STACK_SPEC)["w"]
    assert _kind(out) == _kind(expected)
    np.testing.assert_array_equal(out, expected)


def test_numpy_outputs_come_back_as_under_filter_jit():
    """A NumPy output is traced like any array leaf, as `eqx.filter_jit` traces it: it comes back
    as the JAX array `filter_jit` returns."""

    def fn(p):
        return (p["a"] * p["b"]).sum(), np.float32(1.5), np.ones(2, np.int32)

    packed = tt.pack(_params(), SPEC)
    expected = eqx.filter_jit(fn)(tt.unpack(packed, SPEC))
    assert _kinds(tt.tie(fn, SPEC)(packed)) == _kinds(expected)


class _Net(eqx.Module):
    first: eqx.nn.Linear
    second: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.first = eqx.nn.Linear(4, 4, key=key)
        self.second = eqx.nn.Linear(4, 4, key=key)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")

    def __call__(self, x, state):
        h = jax.nn.relu(self.first(x))
        h, state = self.norm(h, state)
        return self.second(h), state


NET_SPEC = tt.TieSpec(linear=["first", "second"])


def _step(net, state, x):
    y, state = jax.vmap(net, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    return jnp.mean(y**2), state


def test_batchnorm_state_output_has_the_untied_structure_and_types(getkey):
    net, state = eqx.nn.make_with_state(_Net)(getkey())
    x = jax.random.normal(getkey(), (8, 4))
    packed = tt.pack(net, NET_SPEC)
    out = tt.tie(_step, NET_SPEC)(packed, state, x)
    assert _kinds(out) == _kinds(_step(tt.unpack(packed, NET_SPEC), state, x))


def test_batchnorm_model_stepped_three_times_under_filter_jit_traces_once(getkey):
    traces = []

    @eqx.filter_jit
    @tt.tie(NET_SPEC)
    def step(net, state, x):
        traces.append(None)  # a Python side effect: runs once per trace
        return _step(net, state, x)

    net, state = eqx.nn.make_with_state(_Net)(getkey())
    packed = tt.pack(net, NET_SPEC)
    for _ in range(3):
        _, state = step(packed, state, jax.random.normal(getkey(), (8, 4)))
    assert len(traces) == 1

"""Kernel routing inside `tie`: FFNs on tied weights are served by `kernels.ffn`; nothing else."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Tower, assert_trees_close, tower_loss


# Kernel vs XLA reference in f32 on CPU (interpret mode): blockwise f32 accumulation reorders the
# sums of each GEMM; STYLE.md's budget for kernel vs reference is 1e-5 relative.
KERNEL_RTOL = 1e-5


def _kernel_calls(fn, *args) -> int:
    arrays, static = eqx.partition(args, eqx.is_array)
    text = str(jax.make_jaxpr(lambda a: fn(*eqx.combine(a, static)))(arrays))
    return text.count("pallas_call")


def _close(got, want, rtol=KERNEL_RTOL):
    for a, b in zip(
        jax.tree.leaves(eqx.filter(got, eqx.is_array)),
        jax.tree.leaves(eqx.filter(want, eqx.is_array)),
        strict=True,
    ):
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= rtol * scale


@pytest.fixture
def tower_case(getkey):
    tower = Tower(3, key=getkey())
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    return spec, tt.pack(tower, spec), jax.random.normal(getkey(), (4, 8))


def test_each_tied_ffn_site_is_served_by_the_kernel_exactly_once(tower_case):
    spec, packed, x = tower_case
    assert _kernel_calls(tt.tie(tower_loss, spec, fuse_ffn=True), packed, x) == 3
    with tt.ffn_routing_report() as routed:
        tt.tie(tower_loss, spec, fuse_ffn=True)(packed, x)
    assert len(routed) == 3 and all(r.implementation == "interpret" for r in routed)


def test_routed_values_and_gradients_equal_the_unrouted_ones(tower_case):
    spec, packed, x = tower_case
    routed = tt.tie(tower_loss, spec, fuse_ffn=True)
    plain = tt.tie(tower_loss, spec, fuse_ffn=False)
    _close(routed(packed, x), plain(packed, x))
    _close(eqx.filter_grad(routed)(packed, x), eqx.filter_grad(plain)(packed, x))


def test_routing_is_off_by_default_on_cpu_and_when_disabled(tower_case):
    spec, packed, x = tower_case
    assert jax.default_backend() == "cpu"
    assert _kernel_calls(tt.tie(tower_loss, spec), packed, x) == 0
    assert _kernel_calls(tt.tie(tower_loss, spec, fuse_ffn=False), packed, x) == 0


class StackedFFN(eqx.Module):
    """Scan over repetitions; each repetition's FFN weights are slices of stacked arrays."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __call__(self, x):
        def step(h, p):
            w1, b1, w2, b2 = p
            return h + jax.nn.relu(h @ w1 + b1[None, :]) @ w2 + b2[None, :], None

        return jax.lax.scan(step, x, (self.w1, self.b1, self.w2, self.b2))[0]


def test_a_stacked_ffn_tied_across_scan_iterations_is_served_inside_the_scan_body(getkey):
    n, d, hidden = 4, 8, 16
    model = StackedFFN(
        jax.random.normal(getkey(), (n, d, hidden)) / d**0.5,
        jax.random.normal(getkey(), (n, hidden)),
        jax.random.normal(getkey(), (n, hidden, d)) / hidden**0.5,
        jax.random.normal(getkey(), (n, d)),
    )
    spec = tt.TieSpec(ffn=tt.stack("*"))
    packed = tt.pack(model, spec)
    x = jax.random.normal(getkey(), (5, d))
    loss = lambda m, x: jnp.sum(m(x) ** 2)  # noqa: E731
    routed, plain = tt.tie(loss, spec, fuse_ffn=True), tt.tie(loss, spec, fuse_ffn=False)
    with tt.ffn_routing_report() as sites:
        assert _kernel_calls(routed, packed, x) == 1  # one site, in the body, run n times
    assert sites[0].activation == "relu"
    _close(routed(packed, x), plain(packed, x))
    _close(jax.grad(routed)(packed, x), jax.grad(plain)(packed, x))


def _mlp_params(getkey, untied_w2=False):
    d, hidden = 8, 16
    params = {
        "a": {
            "w1": jax.random.normal(getkey(), (d, hidden)),
            "w2": jax.random.normal(getkey(), (hidden, d)),
        },
        "b": {"w1": jnp.zeros((d, hidden)), "w2": jnp.zeros((hidden, d))},
    }
    return params, jax.random.normal(getkey(), (3, d))


def test_an_ffn_whose_weights_are_not_tied_is_left_alone(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(w1=["a.w1", "b.w1"])  # only the first weight is tied

    def loss(p, x):
        return sum(jnp.sum(jnp.tanh(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=True), tt.pack(params, spec), x) == 0


def test_an_ffn_whose_middle_is_not_elementwise_is_left_alone(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(mlp=["a", "b"])

    def loss(p, x):
        return sum(
            jnp.sum(jax.nn.softmax(x @ p[k]["w1"], axis=-1) @ p[k]["w2"]) for k in ("a", "b")
        )

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=True), tt.pack(params, spec), x) == 0


def test_an_activation_that_closes_over_an_array_is_left_alone(getkey):
    # A per-unit scale inside a jitted activation is not elementwise in the hidden tile the
    # kernel applies the activation to; the site must stay with XLA, with the same value.
    params, xs = _mlp_params(getkey)
    x = xs[0]  # rank 1, so the scale multiplies the hidden vector with no broadcast in between
    spec = tt.TieSpec(mlp=["a", "b"])
    scale = jnp.linspace(0.5, 2.0, params["a"]["w1"].shape[1])
    activation = jax.jit(lambda h: jnp.tanh(h) * scale)

    def loss(p, x):
        return sum(jnp.sum(activation(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))

    packed = tt.pack(params, spec)
    routed = tt.tie(loss, spec, fuse_ffn=True)
    assert _kernel_calls(routed, packed, x) == 0
    assert_trees_close(routed(packed, x), loss(tt.unpack(packed, spec), x), summands=2)


def test_an_ffn_in_a_dtype_the_kernel_does_not_take_is_left_to_xla(getkey):
    with jax.enable_x64(True):
        params, x = jax.tree.map(lambda a: a.astype(jnp.float64), _mlp_params(getkey))
        spec = tt.TieSpec(mlp=["a", "b"])

        def loss(p, x):
            return sum(jnp.sum(jnp.tanh(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))

        packed = tt.pack(params, spec)
        routed = tt.tie(loss, spec, fuse_ffn=True)
        assert _kernel_calls(routed, packed, x) == 0
        value = routed(packed, x)
        assert value.dtype == jnp.float64
        assert_trees_close(value, loss(tt.unpack(packed, spec), x), summands=2)


def test_an_ffn_whose_hidden_activation_is_read_elsewhere_is_left_alone(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(mlp=["a", "b"])

    def loss(p, x):
        total = 0.0
        for k in ("a", "b"):
            hidden = jnp.tanh(x @ p[k]["w1"])
            total = total + jnp.sum(hidden @ p[k]["w2"]) + jnp.sum(hidden**2)
        return total

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=True), tt.pack(params, spec), x) == 0


def test_plain_matmul_ffns_with_a_user_activation_are_served(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(mlp=["a", "b"])

    def outputs(p, x):
        return jnp.stack([jnp.sin(2.0 * (x @ p[k]["w1"])) @ p[k]["w2"] for k in ("a", "b")])

    routed, plain = tt.tie(outputs, spec, fuse_ffn=True), tt.tie(outputs, spec, fuse_ffn=False)
    packed = tt.pack(params, spec)
    assert _kernel_calls(routed, packed, x) == 2
    _close(routed(packed, x), plain(packed, x))
    ct = jax.random.normal(getkey(), (2, 3, 8))
    pullback = lambda f: jax.grad(lambda p: jnp.sum(f(p, x) * ct))(packed)  # noqa: E731
    _close(pullback(routed), pullback(plain))


def test_a_vmapped_ffn_with_reshaped_biases_is_served(getkey):
    d, hidden = 8, 16
    spec = tt.TieSpec(mlp=["a", "b"])
    mlp = {
        "w1": jax.random.normal(getkey(), (d, hidden)),
        "b1": jax.random.normal(getkey(), (hidden,)),
    }
    mlp |= {"w2": jax.random.normal(getkey(), (hidden, d)), "b2": jax.random.normal(getkey(), (d,))}
    params = {"a": mlp, "b": jax.tree.map(jnp.zeros_like, mlp)}

    def ffn(p, x):  # per example: (seq, d); vmap reshapes the biases once more
        return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]

    def outputs(p, x):
        return jnp.stack([jax.vmap(lambda e: ffn(p[k], e))(x) for k in ("a", "b")])

    packed, x = tt.pack(params, spec), jax.random.normal(getkey(), (2, 3, d))
    routed, plain = tt.tie(outputs, spec, fuse_ffn=True), tt.tie(outputs, spec, fuse_ffn=False)
    assert _kernel_calls(routed, packed, x) == 2
    _close(routed(packed, x), plain(packed, x))

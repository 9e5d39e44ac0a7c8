"""Kernel routing inside `tie`: FFNs on tied weights are served by `kernels.ffn` (or
`kernels.gated_ffn`) where the kernel's support rules allow, and the report says what ran.

Every test here means interpret mode on the CPU (`fuse_ffn="interpret"`, float32 math at full
precision), whatever the machine: the module pins itself to the CPU device.
"""

import typing
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import Tower, assert_trees_close, tower_loss
from tietransform import _errors, _ffn_routing


# Kernel vs XLA reference in f32 on CPU (interpret mode): blockwise f32 accumulation reorders the
# sums of each GEMM; STYLE.md's budget for kernel vs reference is 1e-5 relative.
KERNEL_RTOL = 1e-5
# bfloat16 compute (8-bit mantissa): kernel and XLA round the hidden activation at different
# points; a few ulps (2^-8) of the largest entry, as in tests/kernels/helpers.py.
BF16_RTOL, BF16_GRAD_RTOL = 2e-2, 5e-2
INTERPRET = "interpret"
KERNEL_PRIMITIVES = ("pallas_call[", "mpmd_map[")  # TPU-style / Mosaic GPU kernels in a jaxpr


@pytest.fixture(autouse=True)
def _on_cpu():
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        yield


def _kernel_calls(fn, *args) -> int:
    arrays, static = eqx.partition(args, eqx.is_array)
    text = str(jax.make_jaxpr(lambda a: fn(*eqx.combine(a, static)))(arrays))
    return sum(text.count(name) for name in KERNEL_PRIMITIVES)


def _close(got, want, rtol=KERNEL_RTOL):
    # Every array leaf, zero-size placeholder records included (they must match too: empty).
    for a, b in zip(
        jax.tree.leaves(eqx.filter(got, eqx.is_array)),
        jax.tree.leaves(eqx.filter(want, eqx.is_array)),
        strict=True,
    ):
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.size:
            scale = max(float(np.max(np.abs(b))), 1e-30)
            assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= rtol * scale


@pytest.fixture
def tower_case(getkey):
    tower = Tower(3, key=getkey())
    spec = tt.TieSpec(ffn="blocks[*].mlp")
    return spec, tt.pack(tower, spec), jax.random.normal(getkey(), (4, 8))


def test_each_tied_ffn_site_is_served_by_the_kernel_exactly_once(tower_case):
    spec, packed, x = tower_case
    assert _kernel_calls(tt.tie(tower_loss, spec, fuse_ffn=INTERPRET), packed, x) == 3
    with tt.ffn_routing_report() as routed:
        tt.tie(tower_loss, spec, fuse_ffn=INTERPRET)(packed, x)
    assert len(routed) == 3 and all(r.implementation == "interpret" for r in routed)


def test_routed_values_and_gradients_equal_the_unrouted_ones(tower_case):
    spec, packed, x = tower_case
    routed = tt.tie(tower_loss, spec, fuse_ffn=INTERPRET)
    plain = tt.tie(tower_loss, spec, fuse_ffn=False)
    _close(routed(packed, x), plain(packed, x))
    _close(eqx.filter_grad(routed)(packed, x), eqx.filter_grad(plain)(packed, x))


def test_routing_is_off_when_disabled_and_by_default_on_cpu(tower_case):
    spec, packed, x = tower_case
    assert _kernel_calls(tt.tie(tower_loss, spec, fuse_ffn=False), packed, x) == 0
    if jax.default_backend() == "cpu":
        assert _kernel_calls(tt.tie(tower_loss, spec), packed, x) == 0
    assert _ffn_routing.routing_for(False) is None


def test_the_default_mode_routes_only_to_compiled_kernels_and_never_warns():
    default = _ffn_routing.routing_for(None)
    if jax.default_backend() == "cpu":
        assert default is None
    else:
        assert default == _ffn_routing.Routing("pallas", warns=False) and not default.warns
    assert _ffn_routing.routing_for(True).warns and _ffn_routing.routing_for("xla").warns


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
    routed, plain = tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.tie(loss, spec, fuse_ffn=False)
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

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.pack(params, spec), x) == 0


def test_an_ffn_whose_middle_is_not_elementwise_is_left_alone(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(mlp=["a", "b"])

    def loss(p, x):
        return sum(
            jnp.sum(jax.nn.softmax(x @ p[k]["w1"], axis=-1) @ p[k]["w2"]) for k in ("a", "b")
        )

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.pack(params, spec), x) == 0


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
    routed = tt.tie(loss, spec, fuse_ffn=INTERPRET)
    assert _kernel_calls(routed, packed, x) == 0
    assert_trees_close(routed(packed, x), loss(tt.unpack(packed, spec), x), summands=2)


def test_an_ffn_in_a_dtype_the_kernel_does_not_take_is_left_to_xla(getkey):
    with jax.enable_x64(True):
        params, x = jax.tree.map(lambda a: a.astype(jnp.float64), _mlp_params(getkey))
        spec = tt.TieSpec(mlp=["a", "b"])

        def loss(p, x):
            return sum(jnp.sum(jnp.tanh(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))

        packed = tt.pack(params, spec)
        routed = tt.tie(loss, spec, fuse_ffn=INTERPRET)
        _errors.reset_warnings()
        with pytest.warns(RuntimeWarning, match="is left to XLA: float64 is not a kernel dtype"):
            assert _kernel_calls(routed, packed, x) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per site: the second trace is silent
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

    assert _kernel_calls(tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.pack(params, spec), x) == 0


def test_plain_matmul_ffns_with_a_user_activation_are_served(getkey):
    params, x = _mlp_params(getkey)
    spec = tt.TieSpec(mlp=["a", "b"])

    def outputs(p, x):
        return jnp.stack([jnp.sin(2.0 * (x @ p[k]["w1"])) @ p[k]["w2"] for k in ("a", "b")])

    routed, plain = tt.tie(outputs, spec, fuse_ffn=INTERPRET), tt.tie(outputs, spec, fuse_ffn=False)
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
    routed, plain = tt.tie(outputs, spec, fuse_ffn=INTERPRET), tt.tie(outputs, spec, fuse_ffn=False)
    assert _kernel_calls(routed, packed, x) == 2
    _close(routed(packed, x), plain(packed, x))


def _two_site_loss(p, x):
    return sum(jnp.sum(jnp.tanh(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))


@pytest.mark.parametrize(
    ("fuse_ffn", "x64", "served_by"),
    [
        (INTERPRET, False, "kernels.ffn[interpret]"),
        ("xla", False, "kernels.ffn[xla]"),
        (INTERPRET, True, "XLA"),
    ],
    ids=["interpret", "xla", "float64-left-to-xla"],
)
def test_the_report_lists_every_site_and_matches_the_kernel_calls_in_the_jaxpr(
    getkey, fuse_ffn, x64, served_by
):
    with jax.enable_x64(x64), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tie: kernels.ffn", RuntimeWarning)
        params, x = _mlp_params(getkey)
        if x64:
            params, x = jax.tree.map(lambda a: a.astype(jnp.float64), (params, x))
        spec = tt.TieSpec(mlp=["a", "b"])
        with tt.ffn_routing_report() as routed:
            calls = _kernel_calls(
                tt.tie(_two_site_loss, spec, fuse_ffn=fuse_ffn), tt.pack(params, spec), x
            )
    assert [r.served_by for r in routed] == [served_by] * 2
    assert calls == sum(r.implementation in ("pallas", "interpret") for r in routed)
    assert all((r.implementation is None) == (r.reason is not None) for r in routed)


def _bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_array(a) else a, tree)


def _close_bf16(got, want, rtol):
    _close(
        jax.tree.map(lambda a: a.astype(jnp.float32), got),
        jax.tree.map(lambda a: a.astype(jnp.float32), want),
        rtol,
    )


def test_an_ffn_on_weights_cast_to_bfloat16_is_served_and_its_gradients_reach_the_f32_buffers(
    tower_case,
):
    spec, packed, x = tower_case

    def loss(model, x):  # mixed precision: float32 master weights, bfloat16 compute
        return tower_loss(_bf16(model), _bf16(x)).astype(jnp.float32)

    routed, plain = tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.tie(loss, spec, fuse_ffn=False)
    with tt.ffn_routing_report() as sites:
        assert _kernel_calls(routed, packed, x) == 3
    assert {s.shape for s in sites} == {"FFN bfloat16[4,8] -> 16 -> 8"}
    _close_bf16(routed(packed, x), plain(packed, x), BF16_RTOL)
    grads, want = eqx.filter_grad(routed)(packed, x), eqx.filter_grad(plain)(packed, x)
    assert {a.dtype for a in jax.tree.leaves(eqx.filter(grads, eqx.is_array))} == {
        jnp.dtype(jnp.float32)
    }
    _close_bf16(grads, want, BF16_GRAD_RTOL)


def _gated_params(getkey, biases: bool, n: int = 2, d: int = 8, hidden: int = 16):
    def one():
        p = {
            "wg": jax.random.normal(getkey(), (d, hidden)) / d**0.5,
            "wu": jax.random.normal(getkey(), (d, hidden)) / d**0.5,
            "w2": jax.random.normal(getkey(), (hidden, d)) / hidden**0.5,
        }
        if biases:
            p |= {
                "bg": jax.random.normal(getkey(), (hidden,)),
                "bu": jax.random.normal(getkey(), (hidden,)),
                "b2": jax.random.normal(getkey(), (d,)),
            }
        return p

    return [one() for _ in range(n)]


def _swiglu(p, x):
    zg, zu = x @ p["wg"], x @ p["wu"]
    if "bg" in p:
        zg, zu = zg + p["bg"][None, :], zu + p["bu"][None, :]
    out = (jax.nn.silu(zg) * zu) @ p["w2"]
    return out + p["b2"][None, :] if "b2" in p else out


@pytest.mark.parametrize("biases", [False, True], ids=["no-biases", "biases"])
def test_a_gated_ffn_on_tied_weights_is_served_by_the_gated_kernel(getkey, biases):
    params, x = _gated_params(getkey, biases), jax.random.normal(getkey(), (3, 8))
    spec = tt.TieSpec(mlp=["[0]", "[1]"])

    def outputs(p, x):
        return jnp.stack([_swiglu(q, x) for q in p])

    packed = tt.pack(params, spec)
    routed, plain = tt.tie(outputs, spec, fuse_ffn=INTERPRET), tt.tie(outputs, spec, fuse_ffn=False)
    with tt.ffn_routing_report() as sites:
        assert _kernel_calls(routed, packed, x) == 2
    assert [s.served_by for s in sites] == ["kernels.gated_ffn[interpret]"] * 2
    _close(routed(packed, x), plain(packed, x))
    ct = jax.random.normal(getkey(), (2, 3, 8))
    pullback = lambda f: jax.grad(lambda p: jnp.sum(f(p, x) * ct))(packed)  # noqa: E731
    _close(pullback(routed), pullback(plain))


def test_a_mixed_precision_gated_ffn_stacked_across_a_scan_is_served_in_the_body(getkey):
    n = 3
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *_gated_params(getkey, True, n=n))
    spec = tt.TieSpec(ffn=tt.stack("*"))
    packed, x = tt.pack(stacked, spec), jax.random.normal(getkey(), (5, 8))

    def loss(p, x):
        def step(h, q):
            # LayerNorm-free residual: keep the quadratic gated update small.
            return h + 0.1 * _swiglu(q, jnp.tanh(h).astype(jnp.bfloat16)).astype(jnp.float32), None

        return jnp.mean(jax.lax.scan(step, x, _bf16(p))[0] ** 2)

    routed, plain = tt.tie(loss, spec, fuse_ffn=INTERPRET), tt.tie(loss, spec, fuse_ffn=False)
    with tt.ffn_routing_report() as sites:
        assert _kernel_calls(routed, packed, x) == 1
    assert [s.served_by for s in sites] == ["kernels.gated_ffn[interpret]"]
    _close_bf16(routed(packed, x), plain(packed, x), BF16_RTOL)
    _close_bf16(jax.grad(routed)(packed, x), jax.grad(plain)(packed, x), BF16_GRAD_RTOL)


def test_the_routing_warning_points_at_the_users_call(getkey):
    with jax.enable_x64(True):
        params, x = jax.tree.map(lambda a: a.astype(jnp.float64), _mlp_params(getkey))
        spec = tt.TieSpec(mlp=["a", "b"])

        def loss(p, x):
            return sum(jnp.sum(jnp.tanh(x @ p[k]["w1"]) @ p[k]["w2"]) for k in ("a", "b"))

        routed = tt.tie(loss, spec, fuse_ffn=INTERPRET)
        _errors.reset_warnings()
        with pytest.warns(RuntimeWarning, match="is left to XLA") as record:
            jax.jit(routed)(tt.pack(params, spec), x)
    assert [w.filename for w in record] == [__file__]


def test_fuse_ffn_accepts_exactly_the_implementations_of_the_kernels():
    from tietransform.kernels.ffn import _api

    assert _ffn_routing.IMPLEMENTATIONS == typing.get_args(_api.Implementation)

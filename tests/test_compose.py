"""`tie` commutes with JAX's transformations, sharding and donation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tietransform as tt
from tests.helpers import Stack, Tower, assert_trees_close, tower_loss


SPEC = tt.TieSpec(ffn="blocks[*].mlp")


@pytest.fixture
def tower(getkey):
    return Tower(3, key=getkey())


@pytest.fixture
def packed(tower):
    return tt.pack(tower, SPEC)


@pytest.fixture
def x(getkey):
    return jax.random.normal(getkey(), (4, 8))


tied_loss = tt.tie(tower_loss, SPEC)


def untied_on_packed(packed, x):
    """The reference semantics: the untied loss at the unpacked model (differentiated through
    unpack)."""
    return tower_loss(tt.unpack(packed, SPEC), x)


def test_tie_commutes_with_jit(packed, x):
    assert_trees_close(
        eqx.filter_jit(tied_loss)(packed, x), eqx.filter_jit(untied_on_packed)(packed, x)
    )
    arrays, static = eqx.partition(packed, eqx.is_array)
    plain_jit = jax.jit(lambda a, x: tied_loss(eqx.combine(a, static), x))
    assert_trees_close(plain_jit(arrays, x), untied_on_packed(packed, x))


def test_tie_commutes_with_grad_under_jit(packed, x):
    got = eqx.filter_jit(eqx.filter_grad(tied_loss))(packed, x)
    want = eqx.filter_jit(eqx.filter_grad(untied_on_packed))(packed, x)
    assert_trees_close(got, want, summands=3)


def test_tie_commutes_with_vjp_and_jvp(packed, x, getkey):
    arrays, static = eqx.partition(packed, eqx.is_array)
    tied = lambda a: tied_loss(eqx.combine(a, static), x)  # noqa: E731
    untied = lambda a: untied_on_packed(eqx.combine(a, static), x)  # noqa: E731
    tangent = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape), arrays)
    # The tangent of a scalar loss sums one product per parameter element, in another order
    # tied than untied: the rounding bound grows with that count, not with the 3 members.
    terms = sum(a.size for a in jax.tree.leaves(arrays))
    assert_trees_close(
        jax.jvp(tied, (arrays,), (tangent,)), jax.jvp(untied, (arrays,), (tangent,)), summands=terms
    )
    ct = jax.random.normal(getkey(), ())
    assert_trees_close(jax.vjp(tied, arrays)[1](ct), jax.vjp(untied, arrays)[1](ct), summands=3)


def test_tie_commutes_with_second_order_derivatives(getkey):
    spec = tt.TieSpec(g=["a", "b"])
    params = {"a": jax.random.normal(getkey(), (3,)), "b": jnp.zeros(3)}
    f = lambda p: jnp.sum(jnp.sin(p["a"]) * jnp.cos(2.0 * p["b"]))  # noqa: E731
    packed = tt.pack(params, spec)
    hessian = jax.hessian(tt.tie(f, spec))(packed)["a"]["a"]
    reference = jax.hessian(lambda a: f({"a": a, "b": a}))(packed["a"])
    assert_trees_close(hessian, reference, summands=4)


def test_tie_commutes_with_vmap_over_inputs(packed, x):
    per_example = lambda m, x: tower_loss(m, x[None])  # noqa: E731
    got = eqx.filter_vmap(tt.tie(per_example, SPEC), in_axes=(None, 0))(packed, x)
    want = eqx.filter_vmap(per_example, in_axes=(None, 0))(tt.unpack(packed, SPEC), x)
    assert_trees_close(got, want)


def test_tie_commutes_with_vmap_over_params(getkey, x):
    ensemble = eqx.filter_vmap(lambda k: tt.pack(Tower(3, key=k), SPEC, copy=False))(
        jax.random.split(getkey(), 2)
    )
    got = eqx.filter_vmap(tied_loss, in_axes=(eqx.if_array(0), None))(ensemble, x)
    want = eqx.filter_vmap(untied_on_packed, in_axes=(eqx.if_array(0), None))(ensemble, x)
    assert got.shape == (2,)
    assert_trees_close(got, want)


def test_tie_commutes_with_scan_over_steps(packed, x):
    arrays, static = eqx.partition(packed, eqx.is_array)

    def run(loss):
        def step(a, _):
            grads = jax.grad(lambda a: loss(eqx.combine(a, static), x))(a)
            return jax.tree.map(lambda p, g: p - 0.1 * g, a, grads), loss(eqx.combine(a, static), x)

        return jax.lax.scan(step, arrays, length=3)

    assert_trees_close(run(tied_loss), run(untied_on_packed), summands=3)


def test_tie_commutes_with_checkpoint(packed, x):
    arrays, static = eqx.partition(packed, eqx.is_array)
    got = jax.grad(jax.checkpoint(lambda a, x: tied_loss(eqx.combine(a, static), x)))(arrays, x)
    want = jax.grad(lambda a, x: untied_on_packed(eqx.combine(a, static), x))(arrays, x)
    assert_trees_close(got, want, summands=3)


def _mesh(axis: str, axis_type: jax.sharding.AxisType, at_least: int = 1):
    """A 1-D mesh over up to four of the devices there are (8 rows split evenly over 1, 2 or
    4); skips when fewer than `at_least` are present."""
    count = jax.device_count()
    if count < at_least:
        pytest.skip(f"needs {at_least} devices, found {count} (set XLA_FLAGS to force more)")
    n = 4 if count >= 4 else 2 if count >= 2 else 1
    return jax.make_mesh((n,), (axis,), axis_types=(axis_type,), devices=jax.devices()[:n])


@pytest.mark.multidevice
def test_tie_commutes_with_shard_map(getkey):
    mesh = _mesh("data", jax.sharding.AxisType.Auto)
    spec = tt.TieSpec(g=["a", "b"])
    packed = tt.pack({"a": jax.random.normal(getkey(), (3, 3)), "b": jnp.zeros((3, 3))}, spec)
    xs = jax.device_put(jax.random.normal(getkey(), (8, 3)), NamedSharding(mesh, P("data")))

    def local_loss(p, x):
        return jax.lax.psum(jnp.sum(jnp.tanh(x @ p["a"]) @ p["b"]), "data")

    sharded = jax.shard_map(
        tt.tie(local_loss, spec), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
    )
    reference = jax.shard_map(
        lambda p, x: local_loss(tt.unpack(p, spec), x),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
    )
    assert_trees_close(
        jax.jit(jax.grad(sharded))(packed, xs), jax.jit(jax.grad(reference))(packed, xs), summands=2
    )


@pytest.mark.multidevice
def test_tie_inside_user_shard_map_is_rewritten_with_its_body(getkey):
    mesh = _mesh("data", jax.sharding.AxisType.Auto)
    spec = tt.TieSpec(g=["a", "b"])
    packed = tt.pack({"a": jax.random.normal(getkey(), (3,)), "b": jnp.zeros(3)}, spec)
    xs = jax.device_put(jax.random.normal(getkey(), (8, 3)), NamedSharding(mesh, P("data")))

    def loss(p, x):
        body = jax.shard_map(
            lambda x: jax.lax.psum(jnp.sum(x @ (p["a"] * p["b"])), "data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P(),
        )
        return body(x)

    assert_trees_close(
        jax.grad(tt.tie(loss, spec))(packed, xs),
        jax.grad(lambda p, x: loss(tt.unpack(p, spec), x))(packed, xs),
        summands=2,
    )


@pytest.mark.multidevice
def test_tie_keeps_explicit_shardings(getkey):
    mesh = _mesh("model", jax.sharding.AxisType.Explicit)
    spec = tt.TieSpec(g=["a", "b"])
    sharding = NamedSharding(mesh, P(None, "model"))
    with jax.set_mesh(mesh):
        params = {
            "a": jax.device_put(jax.random.normal(getkey(), (4, 8)), sharding),
            "b": jnp.zeros((4, 8)),
        }
        packed = tt.pack(params, spec)
        assert packed["a"].sharding == sharding
        f = lambda p, x: jnp.sum(jnp.tanh(x @ p["a"]) * (x @ p["b"]))  # noqa: E731
        grads = jax.jit(jax.grad(tt.tie(f, spec)))(packed, jnp.ones(4))
        want = jax.jit(jax.grad(lambda p, x: f(tt.unpack(p, spec), x)))(packed, jnp.ones(4))
    assert_trees_close(grads, want, summands=2)
    assert jax.typeof(grads["a"]).sharding.spec == P(None, "model")


@pytest.mark.multidevice
def test_packing_a_stack_sharded_on_its_stacked_axis_under_an_explicit_mesh_names_it(getkey):
    mesh = _mesh("layers", jax.sharding.AxisType.Explicit, at_least=2)
    spec = tt.TieSpec(s=tt.stack("w", [0, 2]))
    with jax.set_mesh(mesh):
        w = jax.device_put(jax.random.normal(getkey(), (4, 3)), NamedSharding(mesh, P("layers")))
        with pytest.raises(ValueError, match=r"cannot gather the kept slices \[0, 1, 3\] of w"):
            tt.pack({"w": w}, spec)


def test_donating_the_packed_pytree_frees_its_buffers_and_spares_the_model(tower, x):
    packed = tt.pack(tower, SPEC)
    arrays, static = eqx.partition(packed, eqx.is_array)

    @jax.jit
    def sgd(a, x):
        grads = jax.grad(lambda a: tied_loss(eqx.combine(a, static), x))(a)
        return jax.tree.map(lambda p, g: p - 0.1 * g, a, grads)

    sgd_donating = jax.jit(sgd, donate_argnums=0)
    new = sgd_donating(arrays, x)
    assert_trees_close(new, sgd(eqx.partition(tt.pack(tower, SPEC), eqx.is_array)[0], x))
    assert all(a.is_deleted() for a in jax.tree.leaves(arrays))
    assert not any(a.is_deleted() for a in jax.tree.leaves(eqx.filter(tower, eqx.is_array)))


def test_rebuilding_the_tied_model_does_not_retrace(getkey, x):
    traces = []

    @eqx.filter_jit
    def step(packed, x):
        traces.append(1)
        return tied_loss(packed, x)

    for _ in range(3):
        step(tt.pack(Tower(3, key=getkey()), SPEC), x)
    assert len(traces) == 1


def test_stacked_tie_composes_with_vmap_and_jit(getkey):
    spec = tt.TieSpec(shared=tt.stack("weight", [0, 1, 3]))
    packed = tt.pack(Stack(jax.random.normal(getkey(), (4, 3, 3))), spec)
    xs = jax.random.normal(getkey(), (5, 3))
    tied = jax.jit(jax.vmap(tt.tie(lambda m, x: m(x), spec), in_axes=(None, 0)))
    want = jax.vmap(lambda m, x: tt.unpack(m, spec)(x), in_axes=(None, 0))(packed, xs)
    assert_trees_close(tied(packed, xs), want)
    np.testing.assert_array_equal(
        jax.grad(lambda p: tied(p, xs).sum())(packed).weight.rows, (0, 0, 1, 0)
    )

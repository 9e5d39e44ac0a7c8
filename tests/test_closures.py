"""A tied function that reads a model captured by closure is refused under every transformation.

Its tied gradient would be zero: it never reads the packed buffers. Under `jit`, `grad` and
`vmap` the packed leaves are tracers, so the audit goes by what is known at trace time: every
member of a group unread, beside a captured constant shaped like a member.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import tietransform as tt
from tests.helpers import Tower, assert_trees_close, tower_loss


SPEC = tt.TieSpec(ffn="blocks[*].mlp")
CLOSURE = "reads parameters captured by closure"


def _split(f):
    """`f(model, x)` for JAX's own transformations, which take array-only pytrees."""

    def call(transform, packed, x):
        arrays, static = eqx.partition(packed, eqx.is_array)
        return transform(lambda a, x: f(eqx.combine(a, static), x))(arrays, x)

    return call


TRANSFORMS = {
    "eager": lambda f: lambda p, x: f(p, x),
    "jit": lambda f: lambda p, x: _split(f)(jax.jit, p, x),
    "grad": lambda f: lambda p, x: _split(f)(jax.grad, p, x),
    "vmap": lambda f: lambda p, x: _split(f)(lambda g: jax.vmap(g, in_axes=(None, 0)), p, x[None]),
    "vmap_over_params": lambda f: (
        lambda p, x: eqx.filter_vmap(f, in_axes=(eqx.if_array(0), None))(
            jax.tree.map(lambda a: jnp.stack([a, a]) if eqx.is_array(a) else a, p), x
        )
    ),
    "filter_jit": lambda f: lambda p, x: eqx.filter_jit(f)(p, x),
    "filter_grad": lambda f: lambda p, x: eqx.filter_grad(f)(p, x),
    "jit_of_grad_of_vmap": lambda f: (
        lambda p, x: eqx.filter_jit(
            eqx.filter_grad(lambda p, x: jnp.sum(eqx.filter_vmap(f, in_axes=(None, 0))(p, x[None])))
        )(p, x)
    ),
    "vmap_of_jit": lambda f: (
        lambda p, x: eqx.filter_vmap(eqx.filter_jit(f), in_axes=(None, 0))(p, x[None])
    ),
}


@pytest.fixture
def tower(getkey):
    return Tower(3, key=getkey())


@pytest.fixture
def x(getkey):
    return jax.random.normal(getkey(), (5, 8))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_model_captured_by_closure_is_refused_under_every_transformation(transform, tower, x):
    @tt.tie(SPEC)
    def captured(packed_model, x):
        return jnp.mean(jax.vmap(tower)(x) ** 2)  # the closed-over `tower`, not its argument

    with pytest.raises(ValueError, match=CLOSURE) as error:
        TRANSFORMS[transform](captured)(tt.pack(tower, SPEC), x)
    assert "blocks[0].mlp" in str(error.value)


def test_the_closure_error_names_the_group_the_member_and_the_constant_type(tower, x):
    @tt.tie(SPEC)
    def captured(packed_model, x):
        return tower_loss(tower, x)

    arrays, static = eqx.partition(tt.pack(tower, SPEC), eqx.is_array)
    with pytest.raises(ValueError, match=CLOSURE) as error:
        jax.jit(lambda p, x: captured(eqx.combine(p, static), x))(arrays, x)
    message = str(error.value)
    assert "tie group 'ffn'" in message
    assert "f32[16,8], the shape and dtype of blocks[0].mlp.layers[0].weight" in message
    assert "audit=False" in message


def test_a_stale_captured_copy_is_refused_under_jit(tower, x, getkey):
    stale = Tower(3, key=getkey())  # another model of the same shapes, e.g. before training

    @eqx.filter_jit
    @tt.tie(SPEC)
    def captured(packed_model, x):
        return tower_loss(stale, x)

    with pytest.raises(ValueError, match=CLOSURE):
        captured(tt.pack(tower, SPEC), x)


@pytest.mark.parametrize("transform", ["eager", "jit"])
def test_reading_one_member_from_the_argument_and_the_rest_from_a_closure_is_refused(
    transform, tower, x
):
    @tt.tie(SPEC)
    def partly_captured(packed_model, x):
        h = jax.vmap(packed_model.blocks[0])(x)  # blocks[0] from the argument
        for block in tower.blocks[1:]:  # blocks[1:] from the closed-over model
            h = jax.vmap(block)(h)
        return jnp.mean(h**2)

    call = partly_captured if transform == "eager" else eqx.filter_jit(partly_captured)
    with pytest.raises(ValueError, match=CLOSURE) as error:
        call(tt.pack(tower, SPEC), x)
    message = str(error.value)
    assert "never reads blocks[1].mlp" in message and "(it reads blocks[0].mlp)" in message
    assert "f32[16,8], the shape and dtype of blocks[1].mlp.layers[0].weight" in message


def test_a_closure_inside_an_inner_jit_is_refused(tower, x):
    @tt.tie(SPEC)
    def captured(packed_model, x):
        return jax.jit(lambda x: tower_loss(tower, x))(x)

    with pytest.raises(ValueError, match=CLOSURE):
        eqx.filter_grad(captured)(tt.pack(tower, SPEC), x)


def test_a_closure_inside_a_scan_is_refused(tower, x):
    @tt.tie(SPEC)
    def captured(packed_model, x):
        step = lambda h, _: (jax.vmap(tower)(h), None)  # noqa: E731
        return jnp.sum(jax.lax.scan(step, x, None, length=2)[0])

    with pytest.raises(ValueError, match=CLOSURE):
        eqx.filter_jit(captured)(tt.pack(tower, SPEC), x)


def test_an_unread_group_beside_unrelated_uniform_constants_only_warns_under_jit(x):
    params = {"a": jnp.zeros(8), "c": jnp.zeros(8), "w": jnp.eye(8)}
    spec = tt.TieSpec(g=["a", "c"])
    offset = jnp.ones(8)  # has the members' type, but is a constant, not a captured model

    @jax.jit
    @tt.tie(spec)
    def loss(p, x):
        return jnp.sum(x @ p["w"] + offset[None])

    with pytest.warns(tt.UnreadMemberWarning, match="of tie group 'g' is never read"):
        loss(tt.pack(params, spec), x)


def test_an_unread_group_beside_a_constant_of_another_type_only_warns_under_jit(tower, x):
    table = jnp.arange(12.0).reshape(3, 4)  # no member is f32[3,4]

    @eqx.filter_jit
    @tt.tie(SPEC)
    def loss(model, x):
        return jnp.sum(table) + jnp.sum(x)

    with pytest.warns(tt.UnreadMemberWarning, match="of tie group 'ffn' is never read"):
        loss(tt.pack(tower, SPEC), x)


def test_reading_the_argument_is_accepted_under_jit_with_an_unrelated_lookalike_constant(tower, x):
    bias = jax.random.normal(jax.random.key(1), (16, 8))  # the type of a member's weight

    @eqx.filter_jit
    @tt.tie(SPEC)
    def loss(model, x):
        return tower_loss(model, x) + jnp.sum(bias)

    packed = tt.pack(tower, SPEC)
    expected = tower_loss(tt.unpack(packed, SPEC), x) + jnp.sum(bias)
    # Jitted against eager: XLA fuses and orders the mean's 5 * 8 squares differently.
    assert_trees_close(loss(packed, x), expected, summands=x.size)


def test_the_closure_check_can_be_switched_off(tower, x):
    @eqx.filter_jit
    @tt.tie(SPEC, audit=False)
    def captured(packed_model, x):
        return tower_loss(tower, x)

    assert jnp.allclose(captured(tt.pack(tower, SPEC), x), tower_loss(tower, x))

"""`tt.unpack_grads`: a packed gradient shown at every member, against the untied reference.

The reference is the untied loss differentiated at the unpacked model: a group's gradient is the
sum of its members' gradients, each pulled back through its view (`g.T` for a transpose, `g` for
`w + 1`). `unpack_grads` shows that group gradient at every member, pushed through the view's
derivative; it never adds a view's offset (today's `tt.unpack(grads, spec)` gives `g + 1`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close


SPEC = tt.TieSpec(
    head=tt.view("embed", "head", jnp.transpose),
    shift=tt.view("a", "b", lambda w: w + 1.0),
    pair=["m1", "m2"],
    layers=tt.stack("layers", slices=[0, 1, 2]),
)


def loss(p, x):
    h = jnp.tanh(x @ p["embed"]) @ p["a"] @ p["b"]
    h = jnp.sin(h @ p["m1"]) * jnp.cos(h @ p["m2"])
    for i in range(p["layers"].shape[0]):
        h = jnp.tanh(h @ p["layers"][i])
    return jnp.sum((h @ p["head"]) ** 2)


@pytest.fixture
def problem(getkey):
    d, v = 3, 5
    shapes = {"embed": (v, d), "head": (d, v), "a": (d, d), "b": (d, d), "m1": (d, d)}
    shapes |= {"m2": (d, d), "layers": (4, d, d)}
    params = {k: 0.5 * jax.random.normal(getkey(), s) for k, s in shapes.items()}
    packed = tt.pack(params, SPEC)
    x = jax.random.normal(getkey(), (2, v))
    grads = jax.grad(tt.tie(loss, SPEC))(packed, x)
    untied = jax.grad(loss)(tt.unpack(packed, SPEC), x)  # each member's own gradient
    return packed, grads, untied


def test_a_transposed_view_shows_the_group_gradient_transposed_at_its_target(problem):
    _, grads, g = problem
    group = g["embed"] + g["head"].T
    shown = tt.unpack_grads(grads, SPEC)
    assert_trees_close([shown["embed"], shown["head"]], [group, group.T], summands=2)


def test_an_affine_view_shows_the_group_gradient_without_its_offset(problem):
    _, grads, g = problem
    group = g["a"] + g["b"]
    shown = tt.unpack_grads(grads, SPEC)
    assert_trees_close([shown["a"], shown["b"]], [group, group], summands=2)
    # what `unpack`, which is for params, does to the same gradient: the view's `+ 1`
    np.testing.assert_allclose(tt.unpack(grads, SPEC)["b"], shown["b"] + 1.0, rtol=1e-6)


def test_members_of_a_plain_group_show_the_sum_of_their_untied_gradients(problem):
    _, grads, g = problem
    group = g["m1"] + g["m2"]
    shown = tt.unpack_grads(grads, SPEC)
    assert_trees_close([shown["m1"], shown["m2"]], [group, group], summands=2)


def test_tied_slices_of_a_stack_show_the_group_gradient_and_others_their_own(problem):
    _, grads, g = problem
    group = g["layers"][0] + g["layers"][1] + g["layers"][2]
    expected = jnp.stack([group, group, group, g["layers"][3]])
    assert_trees_close(tt.unpack_grads(grads, SPEC)["layers"], expected, summands=3)


def test_a_linear_view_computed_under_jit_needs_no_params(getkey):
    # jnp.flip is a jitted function: its derivative is read through the inner jaxpr
    spec = tt.TieSpec(flip=tt.view("w", "v", lambda w: 2.0 * jnp.flip(w, 0)))
    w = jax.random.normal(getkey(), (4,))
    packed = tt.pack({"w": w, "v": 2.0 * jnp.flip(w, 0)}, spec)
    f = lambda p: jnp.sum(jnp.sin(p["w"]) * jnp.cos(p["v"]) * jnp.arange(4.0))  # noqa: E731
    grads = jax.grad(tt.tie(f, spec))(packed)
    g = jax.grad(f)(tt.unpack(packed, spec))
    group = g["w"] + 2.0 * jnp.flip(g["v"], 0)  # pulled back through the view
    shown = tt.unpack_grads(grads, spec)
    assert_trees_close([shown["w"], shown["v"]], [group, 2.0 * jnp.flip(group, 0)], summands=2)


def test_a_nonlinear_view_without_params_is_refused_naming_the_view():
    spec = tt.TieSpec(act=tt.view("w", "v", jnp.tanh))
    packed = tt.pack({"w": jnp.ones(3), "v": jnp.ones(3)}, spec)
    with pytest.raises(ValueError, match=r"needs the params to show the gradient at v: .*'act'"):
        tt.unpack_grads(packed, spec)


def test_a_nonlinear_view_with_params_shows_the_gradient_through_its_derivative_there(getkey):
    spec = tt.TieSpec(act=tt.view("w", "v", jnp.tanh))
    w = jax.random.normal(getkey(), (3,))
    packed = tt.pack({"w": w, "v": jnp.tanh(w)}, spec)
    f = lambda p: jnp.sum(jnp.sin(p["w"]) * p["v"] ** 2)  # noqa: E731
    grads = jax.grad(tt.tie(f, spec))(packed)
    g = jax.grad(f)(tt.unpack(packed, spec))
    group = g["w"] + g["v"] * (1.0 - jnp.tanh(w) ** 2)  # pulled back through tanh
    shown = tt.unpack_grads(grads, spec, params=packed)
    expected = [group, group * (1.0 - jnp.tanh(w) ** 2)]  # pushed forward through tanh
    assert_trees_close([shown["w"], shown["v"]], expected, summands=2)


def test_an_update_moves_every_member_as_unpacking_the_updated_params_does(problem):
    packed, grads, _ = problem
    step = jax.tree.map(lambda p, g: p - 0.1 * g, packed, grads)
    moved = jax.tree.map(
        lambda full, d: full - 0.1 * d, tt.unpack(packed, SPEC), tt.unpack_grads(grads, SPEC)
    )
    assert_trees_close(moved, tt.unpack(step, SPEC), summands=2)


def test_params_of_another_structure_are_refused(problem):
    packed, grads, _ = problem
    with pytest.raises(ValueError, match="must have the structure of `grads`"):
        tt.unpack_grads(grads, SPEC, params={"embed": packed["embed"]})


def test_gradients_from_equinox_filter_grad_show_at_every_member(getkey):
    # An MLP holds its activation function, so `filter_grad` gives `None` there.
    spec = tt.TieSpec(ffn=["mlp1", "mlp2"])
    mlp = eqx.nn.MLP(3, 3, 4, depth=1, key=getkey())
    model = {"mlp1": mlp, "mlp2": mlp, "out": eqx.nn.Linear(3, 2, key=getkey())}
    x = jax.random.normal(getkey(), (3,))
    f = lambda m, x: jnp.sum(m["out"](m["mlp2"](jnp.tanh(m["mlp1"](x)))) ** 2)  # noqa: E731
    packed = tt.pack(model, spec)
    grads = eqx.filter_grad(tt.tie(f, spec))(packed, x)
    untied = eqx.filter_grad(f)(tt.unpack(packed, spec), x)
    shown = tt.unpack_grads(grads, spec)
    group = jax.tree.map(jnp.add, untied["mlp1"], untied["mlp2"])
    assert_trees_close([shown["mlp1"], shown["mlp2"]], [group, group], summands=2)
    assert_trees_close(shown["out"], untied["out"])


def test_unpack_grads_runs_under_jit(problem):
    _, grads, _ = problem
    jitted = jax.jit(lambda g: tt.unpack_grads(g, SPEC))(grads)
    assert_trees_close(jitted, tt.unpack_grads(grads, SPEC))

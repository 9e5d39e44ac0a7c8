"""Tying Flax models: an NNX `State` from `nnx.split` and a Linen params dict are packed and tied
like any pytree, and training them with plain optax keeps one buffer per group.

The reference is always the untied model whose members actually hold equal values
(`unpack(pack(m))`): the tied loss equals its loss, and the gradient of each group's buffer equals
the sum of the gradients its members receive there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn, nnx

import tietransform as tt
from tests.helpers import assert_trees_close


# Every weight is WIDTH x WIDTH: eager initialisation compiles once per shape, so one shape keeps
# the suite fast. The LM's embedding is then square too; its view still checks the transpose, since
# the embedding is not symmetric.
N, WIDTH, VOCAB = 3, 4, 4


class NnxBlock(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.attn = nnx.Linear(width, width, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(width, width, rngs=rngs),
            jax.nn.gelu,
            nnx.Linear(width, width, rngs=rngs),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + jnp.tanh(self.attn(x))
        return x + self.mlp(x)


class NnxTower(nnx.Module):
    def __init__(self, n: int, width: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([NnxBlock(width, rngs=rngs) for _ in range(n)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class NnxDropoutTower(nnx.Module):
    """`NnxTower` with dropout after every block: the Flax page's recipe."""

    def __init__(self, n: int, width: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([NnxBlock(width, rngs=rngs) for _ in range(n)])
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = self.dropout(block(x))
        return x


class LinenMLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.width)(nn.gelu(nn.Dense(self.width)(x)))


class LinenBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + jnp.tanh(nn.Dense(self.width, name="attn")(x))
        return x + LinenMLP(self.width, name="mlp")(x)


class LinenLM(nn.Module):
    """Embedding, `n` blocks (named `blocks_0`, ...), a bias-free head of shape (width, vocab)."""

    n: int
    width: int
    vocab: int

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.width)
        self.blocks = [LinenBlock(self.width) for _ in range(self.n)]
        self.head = nn.Dense(self.vocab, use_bias=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


NNX_SPEC = tt.TieSpec(ffn="blocks[*].mlp")
LINEN_SPEC = tt.TieSpec(
    ffn="blocks_*.mlp",
    head=tt.view("embed.embedding", "head.kernel", jnp.transpose),
)


@pytest.fixture(scope="module")
def nnx_split():
    return nnx.split(NnxTower(N, WIDTH, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def linen_params():
    model = LinenLM(N, WIDTH, VOCAB)
    return model, model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]


def nnx_loss_fn(graphdef):
    def loss(state, x, y):
        model = nnx.merge(graphdef, state)
        return jnp.mean((model(x) - y) ** 2)

    return loss


def linen_loss_fn(model):
    def loss(params, tokens, targets):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    return loss


def _data(n_rows: int = 5):
    x = jax.random.normal(jax.random.key(1), (n_rows, WIDTH))
    tokens = jax.random.randint(jax.random.key(2), (n_rows,), 0, VOCAB)
    return x, jnp.sin(x), tokens


def _buffers(tree) -> list[jax.Array]:
    """The arrays holding values (zero-size leaves, such as layout records, hold none)."""
    return [x for x in jax.tree.leaves(tree) if np.size(x)]


def _summed(trees):
    return jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *trees)


def test_a_where_function_may_return_branches_of_an_nnx_state(nnx_split):
    # `state["blocks"][i]["mlp"]` is a new State around the pytree's inner dict on every read.
    _, state = nnx_split
    spec = tt.TieSpec(ffn=lambda s: [s["blocks"][i]["mlp"] for i in range(N)])
    packed = tt.pack(state, spec)
    assert jax.tree.structure(packed) == jax.tree.structure(tt.pack(state, NNX_SPEC))
    np.testing.assert_array_equal(  # the same buffers as the pattern's
        np.concatenate([np.ravel(x) for x in _buffers(packed)]),
        np.concatenate([np.ravel(x) for x in _buffers(tt.pack(state, NNX_SPEC))]),
    )


@pytest.mark.parametrize("pattern", ["blocks[*].mlp", "blocks.*.mlp", "['blocks'][*]['mlp']"])
def test_path_patterns_select_each_blocks_mlp_in_an_nnx_state(nnx_split, pattern):
    _, state = nnx_split
    packed = tt.pack(state, tt.TieSpec(ffn=pattern))
    assert jax.tree.structure(packed) == jax.tree.structure(tt.pack(state, NNX_SPEC))
    assert len(_buffers(packed)) == len(_buffers(state)) - (N - 1) * 4  # 2 weights, 2 biases


def test_tied_nnx_loss_and_grads_equal_the_untied_state_with_equal_members(nnx_split):
    graphdef, state = nnx_split
    x, y, _ = _data()
    loss = nnx_loss_fn(graphdef)
    packed = tt.pack(state, NNX_SPEC)
    full = tt.unpack(packed, NNX_SPEC)
    value, grads = jax.jit(jax.value_and_grad(tt.tie(loss, NNX_SPEC)))(packed, x, y)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(full, x, y)
    assert_trees_close(value, ref_value)
    assert_trees_close(
        grads["blocks"][0]["mlp"], _summed([ref_grads["blocks"][i]["mlp"] for i in range(N)]), N
    )
    for i in range(N):
        assert_trees_close(grads["blocks"][i]["attn"], ref_grads["blocks"][i]["attn"])


def test_optax_steps_on_a_packed_nnx_state_keep_one_buffer_per_group(nnx_split):
    graphdef, state = nnx_split
    x, y, _ = _data()
    loss = tt.tie(nnx_loss_fn(graphdef), NNX_SPEC)
    packed = tt.pack(state, NNX_SPEC)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(packed)

    @jax.jit
    def step(packed, opt_state):
        value, grads = jax.value_and_grad(loss)(packed, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, packed)
        return optax.apply_updates(packed, updates), opt_state, value

    # optax's Adam mixes Python floats with int32 step counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        values = []
        for _ in range(3):
            packed, opt_state, value = step(packed, opt_state)
            values.append(value)
    assert values[-1] < values[0]
    assert jax.tree.structure(packed) == jax.tree.structure(tt.pack(state, NNX_SPEC))
    assert len(_buffers(packed)) == len(_buffers(opt_state[0].mu)) == len(_buffers(state)) - 8
    model = nnx.merge(graphdef, tt.unpack(packed, NNX_SPEC))
    first, last = model.blocks[0].mlp.layers[0].kernel, model.blocks[N - 1].mlp.layers[0].kernel
    assert first[...] is last[...]
    assert not np.array_equal(first[...], state["blocks"][0]["mlp"]["layers"][0]["kernel"][...])


def test_tied_linen_apply_and_grads_equal_the_untied_params_with_equal_members(linen_params):
    model, params = linen_params
    _, _, tokens = _data()
    targets = jnp.roll(tokens, 1)
    loss = linen_loss_fn(model)
    packed = tt.pack(params, LINEN_SPEC)
    full = tt.unpack(packed, LINEN_SPEC)
    np.testing.assert_array_equal(full["head"]["kernel"], full["embed"]["embedding"].T)
    tied = jax.jit(jax.value_and_grad(tt.tie(loss, LINEN_SPEC)))
    value, grads = tied(packed, tokens, targets)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(full, tokens, targets)
    assert_trees_close(value, ref_value)
    expected = _summed([ref_grads[f"blocks_{i}"]["mlp"] for i in range(N)])
    assert_trees_close(grads["blocks_0"]["mlp"], expected, N)
    embedding = _summed([ref_grads["embed"]["embedding"], ref_grads["head"]["kernel"].T])
    assert_trees_close(grads["embed"]["embedding"], embedding, 2)


def test_optax_steps_on_packed_linen_params_keep_one_buffer_per_group(linen_params):
    model, params = linen_params
    _, _, tokens = _data()
    loss = tt.tie(linen_loss_fn(model), LINEN_SPEC)
    packed = tt.pack(params, LINEN_SPEC)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(packed)

    @jax.jit
    def step(packed, opt_state):
        value, grads = jax.value_and_grad(loss)(packed, tokens, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, packed)
        return optax.apply_updates(packed, updates), opt_state, value

    values = []
    for _ in range(3):
        packed, opt_state, value = step(packed, opt_state)
        values.append(value)
    assert values[-1] < values[0]
    assert jax.tree.structure(packed) == jax.tree.structure(tt.pack(params, LINEN_SPEC))
    assert len(_buffers(packed)) == len(_buffers(params)) - (N - 1) * 4 - 1  # and the head
    full = tt.unpack(packed, LINEN_SPEC)
    first, last = full["blocks_0"]["mlp"]["Dense_0"], full[f"blocks_{N - 1}"]["mlp"]["Dense_0"]
    assert first["kernel"] is last["kernel"]
    np.testing.assert_array_equal(full["head"]["kernel"], full["embed"]["embedding"].T)


def test_nnx_steps_that_return_rest_draw_new_dropout_masks_each_step():
    graphdef, state, rest = nnx.split(
        NnxDropoutTower(N, WIDTH, rngs=nnx.Rngs(params=0, dropout=1)), nnx.Param, ...
    )
    x, y, _ = _data()

    @tt.tie(NNX_SPEC)
    def loss(params, rest, x, y):  # as the Flax page writes it
        model = nnx.merge(graphdef, params, rest)
        value = jnp.mean((model(x) - y) ** 2)
        return value, nnx.state(model, nnx.Not(nnx.Param))

    optimizer = optax.sgd(0.0)  # the params stay put: losses can differ only by their masks

    @jax.jit
    def step(packed, opt_state, rest):
        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(packed, rest, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, packed)
        return optax.apply_updates(packed, updates), opt_state, rest, value

    packed = tt.pack(state, NNX_SPEC)
    packed, opt_state, advanced, first = step(packed, optimizer.init(packed), rest)
    _, _, _, second = step(packed, opt_state, advanced)
    _, _, _, replayed = step(packed, opt_state, rest)  # the first step's `rest` again
    assert second != first
    assert replayed == first  # so the masks changed with `rest`, not from step to step

"""A language model's output head tied to its input embedding, in each library's orientation, as
the declaring page shows: Equinox stores `Linear(D, V).weight` as (out, in) = (V, D), the layout
of `eqx.nn.Embedding(V, D).weight`, so a plain group ties them; Flax stores a kernel as
(in, out) = (D, V), so the head is a transposing view of the (V, D) embedding.

Each tied model is compared with a hand-tied one: a function of one (V, D) matrix `E`, reading
`E[tokens]` as the embedding and `h @ E.T` as the head, and its gradient with respect to `E`.
With V == D both orientations pass every shape check, so only the values can tell a head tied
the wrong way round (the embedding is not symmetric).
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn, nnx

import tietransform as tt
from tests.helpers import assert_trees_close


V = D = 4
TOKENS = jnp.array([0, 3, 1, 2, 3])
TARGETS = jnp.roll(TOKENS, 1)


def _xent(logits: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS))


def hand_tied_logits(embedding: jax.Array) -> jax.Array:
    return jnp.tanh(embedding[TOKENS]) @ embedding.T


def _assert_matches_hand_tied(logits: jax.Array, grad: jax.Array, embedding: jax.Array) -> None:
    """`grad`: the tied loss's gradient with respect to the embedding's buffer."""
    assert not jnp.allclose(embedding, embedding.T)  # else the orientation could not show
    # float32. Each logit is a dot of D terms. The embedding's gradient adds its two readers':
    # the head's, a sum over the tokens, and the lookup's, each row a dot over the V logits.
    assert_trees_close(logits, hand_tied_logits(embedding), summands=D)
    expected = jax.grad(lambda e: _xent(hand_tied_logits(e)))(embedding)
    assert_trees_close(grad, expected, summands=len(TOKENS) + V)


class EqxLM(eqx.Module):
    embed: eqx.nn.Embedding  # weight (V, D)
    head: eqx.nn.Linear  # weight (out, in) = (V, D)

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(V, D, key=k1)
        self.head = eqx.nn.Linear(D, V, use_bias=False, key=k2)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jax.vmap(self.head)(jnp.tanh(jax.vmap(self.embed)(tokens)))


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        hidden = jnp.tanh(nn.Embed(V, D, name="embed")(tokens))  # embedding (V, D)
        return nn.Dense(V, use_bias=False, name="head")(hidden)  # kernel (in, out) = (D, V)


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)  # embedding (V, D)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)  # kernel (in, out) = (D, V)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(jnp.tanh(self.embed(tokens)))


FLAX_SPEC = tt.TieSpec(head=tt.view("embed.embedding", "head.kernel", jnp.transpose))


def _tied_logits_and_grad(forward, spec: tt.TieSpec, params: Any):
    packed = tt.pack(params, spec)
    tied = tt.tie(lambda p: forward(p), spec)
    logits = jax.jit(tied)(packed)
    grads = jax.jit(jax.grad(lambda p: _xent(tied(p))))(packed)
    return logits, grads


def test_an_equinox_linear_head_tied_by_a_plain_group_is_the_hand_tied_head():
    model = EqxLM(jax.random.key(0))
    spec = tt.TieSpec(head=["embed.weight", "head.weight"])  # both (V, D): no view
    logits, grads = _tied_logits_and_grad(lambda m: m(TOKENS), spec, model)
    _assert_matches_hand_tied(logits, grads.embed.weight, model.embed.weight)


def test_a_flax_linen_dense_head_tied_by_a_transposing_view_is_the_hand_tied_head():
    module = LinenLM()
    params = module.init(jax.random.key(0), TOKENS)["params"]
    logits, grads = _tied_logits_and_grad(
        lambda p: module.apply({"params": p}, TOKENS), FLAX_SPEC, params
    )
    _assert_matches_hand_tied(logits, grads["embed"]["embedding"], params["embed"]["embedding"])


def test_a_flax_nnx_linear_head_tied_by_a_transposing_view_is_the_hand_tied_head():
    graphdef, params = nnx.split(NnxLM(nnx.Rngs(0)))
    logits, grads = _tied_logits_and_grad(
        lambda p: nnx.merge(graphdef, p)(TOKENS), FLAX_SPEC, params
    )
    embedding = params["embed"]["embedding"][...]
    _assert_matches_hand_tied(logits, grads["embed"]["embedding"][...], embedding)

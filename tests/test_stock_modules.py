"""Stock modules tie: every Equinox `eqx.nn` module and the common Flax ones, packed and tied as a
list of blocks and as a stack of layers scanned over, give the untied reference's values and
gradients.

The reference is `tietransform.testing.check_tied`: the untied function evaluated on the model
`unpack(pack(m))`, whose members hold their group's values, and each buffer's gradient the float64
sum of the gradients its members (or a stack's slices) receive there, pulled back along random
cotangents. Tolerances are `tolerance(float32, members)`: a sum of `n` float32 terms, added in
another order. Each loss is jitted, as users run it: the tied and the untied programs are then
compiled from jaxprs that differ only by the tie's substitution. (Run eagerly, the reference's
linearisation executes op by op while the tied program runs compiled. After three attention
layers with dropout the two losses then differed by 1.3e-6: 2e-7 of the summed terms'
magnitudes, but 2.4e-6 of the loss, whose terms cancel, and `check_tied` scales the value's
error by the value alone.)

Every layer maps `h` of shape `(SEQ, WIDTH)` to the same shape, so layers compose. Their float
parameters are redrawn at random (LayerNorm's ones and zeros included), so members differ before
packing and reading the wrong member's values would show.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, nnx

import tietransform as tt
from tests.helpers import array_bytes
from tietransform.testing import check_tied


# Shapes repeat across modules (every hidden size and the vocabulary are WIDTH): `pack` and
# `unpack` compile their small copy programs once per shape, so shared shapes keep this file fast.
LAYERS, SEQ, WIDTH, HEADS = 3, 3, 4, 2
VOCAB = HIDDEN = WIDTH
LIST_SPEC = tt.TieSpec(layer="blocks[*]")
STACK_SPEC = tt.TieSpec(layer=tt.stack("blocks"))


class Data(NamedTuple):
    h: jax.Array  # (SEQ, WIDTH) floats: the layers' input and output
    tokens: jax.Array  # (SEQ,) ints < VOCAB: what embeddings read
    key: jax.Array  # dropout's randomness, split once per layer


def _data() -> Data:
    rng = np.random.default_rng(1)
    h = rng.standard_normal((SEQ, WIDTH)).astype(np.float32)
    return Data(jnp.asarray(h), jnp.asarray(rng.integers(0, VOCAB, SEQ)), jax.random.key(3))


def _drawn(abstract: Any) -> Any:
    """`abstract` (from `eval_shape`) with each array drawn from N(0, 1/4), so no two members are
    equal. Models are built abstractly and filled from NumPy: building them eagerly would compile
    every initialiser op by op, which took most of this file's time."""
    rng = np.random.default_rng(2)

    def draw(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x  # activation functions, Dropout's float p, ...
        assert jnp.issubdtype(x.dtype, jnp.floating), x
        return jnp.asarray(np.asarray(0.5 * rng.standard_normal(x.shape), x.dtype))

    return jax.tree.map(draw, abstract)


def _loss(out: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(out))  # not a quadratic: the cotangent varies with the output


# --- Equinox -----------------------------------------------------------------------------------


class RopeAttention(eqx.Module):
    """Self-attention with rotary embeddings on its queries and keys (RoPE holds no arrays)."""

    attn: eqx.nn.MultiheadAttention
    rope: eqx.nn.RotaryPositionalEmbedding

    def __init__(self, key: jax.Array):
        self.attn = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=key)
        self.rope = eqx.nn.RotaryPositionalEmbedding(WIDTH // HEADS)

    def __call__(self, h: jax.Array) -> jax.Array:
        def process_heads(q, k, v):
            rotate = jax.vmap(self.rope, in_axes=1, out_axes=1)
            return rotate(q), rotate(k), v

        return h + self.attn(h, h, h, process_heads=process_heads)


class EqxCase(NamedTuple):
    make: Callable[[jax.Array], eqx.Module]  # one layer from a key
    apply: Callable[[Any, Data], jax.Array]  # one layer: data.h -> the next h


EQX_CASES = {
    "Linear": EqxCase(
        lambda k: eqx.nn.Linear(WIDTH, WIDTH, key=k),
        lambda m, d: jnp.tanh(jax.vmap(m)(d.h)),
    ),
    "MLP": EqxCase(
        lambda k: eqx.nn.MLP(WIDTH, WIDTH, HIDDEN, depth=2, activation=jax.nn.gelu, key=k),
        lambda m, d: jax.vmap(m)(d.h),
    ),
    "MLP-final-activation": EqxCase(
        lambda k: eqx.nn.MLP(WIDTH, WIDTH, HIDDEN, depth=1, final_activation=jnp.tanh, key=k),
        lambda m, d: jax.vmap(m)(d.h),
    ),
    "MultiheadAttention-dropout": EqxCase(
        lambda k: eqx.nn.MultiheadAttention(HEADS, WIDTH, dropout_p=0.5, inference=False, key=k),
        lambda m, d: d.h + m(d.h, d.h, d.h, key=d.key),
    ),
    "MultiheadAttention-deterministic": EqxCase(
        lambda k: eqx.nn.MultiheadAttention(HEADS, WIDTH, dropout_p=0.5, key=k),
        lambda m, d: d.h + m(d.h, d.h, d.h, inference=True),
    ),
    "LayerNorm": EqxCase(
        lambda k: eqx.nn.LayerNorm(WIDTH),
        lambda m, d: jax.vmap(m)(d.h),
    ),
    "RMSNorm": EqxCase(
        lambda k: eqx.nn.RMSNorm(WIDTH),
        lambda m, d: jax.vmap(m)(d.h),
    ),
    "Embedding": EqxCase(
        lambda k: eqx.nn.Embedding(VOCAB, WIDTH, key=k),
        lambda m, d: jnp.tanh(d.h + jax.vmap(m)(d.tokens)),
    ),
    "Conv1d": EqxCase(  # channels first: (WIDTH, SEQ)
        lambda k: eqx.nn.Conv1d(WIDTH, WIDTH, kernel_size=3, padding=1, key=k),
        lambda m, d: jnp.tanh(m(d.h.T).T),
    ),
    "GRUCell": EqxCase(  # each row is its own input and hidden state
        lambda k: eqx.nn.GRUCell(WIDTH, WIDTH, key=k),
        lambda m, d: jax.vmap(m)(d.h, d.h),
    ),
    "RotaryPositionalEmbedding": EqxCase(RopeAttention, lambda m, d: m(d.h)),
}


def _eqx_list(case: EqxCase) -> dict[str, list[Any]]:
    def build(keys):
        return {"blocks": [case.make(k) for k in keys]}

    return _drawn(eqx.filter_eval_shape(build, jax.random.split(jax.random.key(0), LAYERS)))


def _eqx_stack(case: EqxCase) -> dict[str, Any]:
    """The standard Equinox scan-over-layers model: `filter_vmap` of the constructor."""

    def build(keys):
        return {"blocks": eqx.filter_vmap(case.make)(keys)}

    return _drawn(eqx.filter_eval_shape(build, jax.random.split(jax.random.key(0), LAYERS)))


def _eqx_list_loss(case: EqxCase) -> Callable[..., jax.Array]:
    def loss(model, data: Data) -> jax.Array:
        h = data.h
        for block, key in zip(model["blocks"], jax.random.split(data.key, LAYERS)):
            h = case.apply(block, data._replace(h=h, key=key))
        return _loss(h)

    return loss


def _eqx_scan_loss(case: EqxCase) -> Callable[..., jax.Array]:
    def loss(model, data: Data) -> jax.Array:
        arrays, static = eqx.partition(model["blocks"], eqx.is_array)

        def layer(h, xs):
            arrays, key = xs
            return case.apply(eqx.combine(arrays, static), data._replace(h=h, key=key)), None

        h, _ = jax.lax.scan(layer, data.h, (arrays, jax.random.split(data.key, LAYERS)))
        return _loss(h)

    return loss


@pytest.mark.parametrize("name", EQX_CASES)
def test_equinox_module_as_a_list_of_blocks_ties_to_the_untied_reference(name):
    case = EQX_CASES[name]
    check_tied(eqx.filter_jit(_eqx_list_loss(case)), LIST_SPEC, _eqx_list(case), _data())


@pytest.mark.parametrize("name", EQX_CASES)
def test_equinox_module_as_a_scanned_stack_ties_to_the_untied_reference(name):
    case = EQX_CASES[name]
    check_tied(eqx.filter_jit(_eqx_scan_loss(case)), STACK_SPEC, _eqx_stack(case), _data())


@pytest.mark.parametrize("name", EQX_CASES)
def test_a_packed_list_of_equinox_blocks_holds_one_blocks_arrays(name):
    model = _eqx_list(EQX_CASES[name])
    assert array_bytes(tt.pack(model, LIST_SPEC)) == array_bytes(model["blocks"][0])


@pytest.mark.parametrize("name", EQX_CASES)
def test_a_packed_equinox_stack_holds_one_layers_arrays(name):
    model = _eqx_stack(EQX_CASES[name])
    assert array_bytes(tt.pack(model, STACK_SPEC)) * LAYERS == array_bytes(model)


# --- Flax NNX ----------------------------------------------------------------------------------


# Flax's attention has one `use_bias` for its query, key, value and output projections. The key
# bias's gradient is zero in exact arithmetic (it adds `q . b` to every logit of a query's row,
# and softmax ignores a constant shift), so what float32 computes for it is rounding noise, which
# no relative tolerance can compare between two programs. Equinox's attention has no biases by
# default.
_NO_KEY_BIAS = False


class NnxCase(NamedTuple):
    make: Callable[[nnx.Rngs], nnx.Module]
    apply: Callable[[Any, Data], jax.Array]


NNX_CASES = {
    "Linear": NnxCase(
        lambda r: nnx.Linear(WIDTH, WIDTH, rngs=r),
        lambda m, d: jnp.tanh(m(d.h)),
    ),
    "MultiHeadAttention": NnxCase(  # no biases: see _NO_KEY_BIAS
        lambda r: nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, use_bias=_NO_KEY_BIAS, rngs=r),
        lambda m, d: d.h + m(d.h),
    ),
    "LayerNorm": NnxCase(
        lambda r: nnx.LayerNorm(WIDTH, rngs=r),
        lambda m, d: m(d.h),
    ),
    "Embed": NnxCase(
        lambda r: nnx.Embed(VOCAB, WIDTH, rngs=r),
        lambda m, d: jnp.tanh(d.h + m(d.tokens)),
    ),
}


class NnxList(nnx.Module):
    def __init__(self, case: NnxCase):
        self.blocks = nnx.List([case.make(nnx.Rngs(i)) for i in range(LAYERS)])


class NnxStack(nnx.Module):
    """Layers stacked with `nnx.vmap`, the Flax NNX scan-over-layers recipe."""

    def __init__(self, case: NnxCase):
        make = nnx.vmap(lambda key: case.make(nnx.Rngs(key)), in_axes=0, out_axes=0)
        self.blocks = make(jax.random.split(jax.random.key(0), LAYERS))


def _nnx_split(build: Callable[[], nnx.Module]):
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    return graphdef, _drawn(params), _drawn(rest)


def _nnx_list_loss(case: NnxCase, graphdef) -> Callable[..., jax.Array]:
    def loss(params, rest, data: Data) -> jax.Array:
        h = data.h
        for block in nnx.merge(graphdef, params, rest).blocks:
            h = case.apply(block, data._replace(h=h))
        return _loss(h)

    return loss


def _nnx_scan_loss(case: NnxCase, graphdef) -> Callable[..., jax.Array]:
    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
    def layers(h, block, data: Data):
        return case.apply(block, data._replace(h=h))

    def loss(params, rest, data: Data) -> jax.Array:
        return _loss(layers(data.h, nnx.merge(graphdef, params, rest).blocks, data))

    return loss


@pytest.mark.parametrize("name", NNX_CASES)
def test_flax_nnx_module_as_a_list_of_blocks_ties_to_the_untied_reference(name):
    case = NNX_CASES[name]
    graphdef, params, rest = _nnx_split(lambda: NnxList(case))
    check_tied(eqx.filter_jit(_nnx_list_loss(case, graphdef)), LIST_SPEC, params, rest, _data())


@pytest.mark.parametrize("name", NNX_CASES)
def test_flax_nnx_module_stacked_with_vmap_and_run_with_nnx_scan_ties_to_the_reference(name):
    case = NNX_CASES[name]
    graphdef, params, rest = _nnx_split(lambda: NnxStack(case))
    check_tied(eqx.filter_jit(_nnx_scan_loss(case, graphdef)), STACK_SPEC, params, rest, _data())


@pytest.mark.parametrize("name", NNX_CASES)
def test_a_packed_flax_nnx_stack_holds_one_layers_arrays(name):
    _, params, _ = _nnx_split(lambda: NnxStack(NNX_CASES[name]))
    assert array_bytes(tt.pack(params, STACK_SPEC)) * LAYERS == array_bytes(params)


# --- Flax Linen --------------------------------------------------------------------------------


class LinenCase(NamedTuple):
    make: Callable[[], nn.Module]  # called inside a compact method or setup
    apply: Callable[[Any, Data], jax.Array]


LINEN_CASES = {
    "Dense": LinenCase(lambda: nn.Dense(WIDTH), lambda m, d: jnp.tanh(m(d.h))),
    "MultiHeadDotProductAttention": LinenCase(
        lambda: nn.MultiHeadDotProductAttention(HEADS, deterministic=True, use_bias=_NO_KEY_BIAS),
        lambda m, d: d.h + m(d.h),
    ),
    "LayerNorm": LinenCase(lambda: nn.LayerNorm(), lambda m, d: m(d.h)),
    "Embed": LinenCase(lambda: nn.Embed(VOCAB, WIDTH), lambda m, d: jnp.tanh(d.h + m(d.tokens))),
}


class LinenList(nn.Module):
    """`LAYERS` blocks in a list: Linen names them `blocks_0`, `blocks_1`, ..."""

    case: LinenCase

    def setup(self):
        self.blocks = [self.case.make() for _ in range(LAYERS)]

    def __call__(self, data: Data) -> jax.Array:
        h = data.h
        for block in self.blocks:
            h = self.case.apply(block, data._replace(h=h))
        return h


class LinenLayer(nn.Module):
    case: LinenCase

    @nn.compact
    def __call__(self, h: jax.Array, data: Data) -> tuple[jax.Array, None]:
        return self.case.apply(self.case.make(), data._replace(h=h)), None


class LinenScan(nn.Module):
    """The layers under `nn.scan`: each parameter stacked along a leading axis of `LAYERS`."""

    case: LinenCase

    @nn.compact
    def __call__(self, data: Data) -> jax.Array:
        scanned = nn.scan(
            LinenLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=LAYERS,
        )
        return scanned(self.case, name="blocks")(data.h, data)[0]


def _linen(module: nn.Module):
    params = jax.eval_shape(module.init, jax.random.key(0), _data())["params"]

    def loss(params, data: Data) -> jax.Array:
        return _loss(module.apply({"params": params}, data))

    return loss, _drawn(params)


@pytest.mark.parametrize("name", LINEN_CASES)
def test_flax_linen_module_as_a_list_of_blocks_ties_to_the_untied_reference(name):
    loss, params = _linen(LinenList(LINEN_CASES[name]))
    check_tied(eqx.filter_jit(loss), tt.TieSpec(layer="blocks_*"), params, _data())


@pytest.mark.parametrize("name", LINEN_CASES)
def test_flax_linen_module_under_nn_scan_ties_to_the_untied_reference(name):
    loss, params = _linen(LinenScan(LINEN_CASES[name]))
    check_tied(eqx.filter_jit(loss), STACK_SPEC, params, _data())


@pytest.mark.parametrize("name", LINEN_CASES)
def test_a_packed_flax_linen_stack_holds_one_layers_arrays(name):
    _, params = _linen(LinenScan(LINEN_CASES[name]))
    assert array_bytes(tt.pack(params, STACK_SPEC)) * LAYERS == array_bytes(params)

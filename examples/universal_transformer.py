"""A Universal Transformer with one FFN shared by every repetition, tied with one line.

The model is plain Equinox, written as if nothing were tied: `n` repetitions of (self-attention,
FFN), run with `lax.scan` over stacked per-repetition weights. Every leaf of `blocks.attn` and of
`blocks.mlp` has a leading axis of size `n`. One line then shares the FFN across repetitions while
each repetition keeps its own attention:

    spec = tt.TieSpec(ffn=tt.stack("blocks.mlp"))

`tt.pack` keeps one FFN's worth of weights (and so one FFN's worth of gradients and Adam state),
and `tt.tie` rewrites the scan so that every iteration reads that one buffer: no `n`-fold copy is
built, forward or backward.

The task is multi-digit addition, least significant digit first: position `i` holds the digit
pair `(a_i, b_i)` and the model predicts digit `i` of `a + b`. The carry into digit `i` depends on
every lower digit, so it takes rounds of (causal) attention to propagate; digit pairs summing to 9
are drawn often, to make long carry chains common.

    python examples/universal_transformer.py [--n 4] [--width 64] [--steps 1500] [--seed 0]
        [--precision float32|bfloat16|mixed] [--devices N] [--param-sharding replicated|fsdp]

`--devices N` trains data-parallel on the first `N` visible devices (`jax.devices()`): the batch
is split over a one-axis mesh `("data",)`, the step runs under `jax.set_mesh(mesh)` and XLA sums
the gradients over the shards. `--param-sharding fsdp` also shards every parameter (the tied FFN
buffer included) and the Adam state on its largest axis that the devices divide; `replicated`
(the default) keeps a copy per device. On CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=4` gives four devices to try it.

`--precision`: `float32` (the default; what trains best on CPU), `bfloat16` (weights, optimizer
state and compute in bfloat16) or `mixed` (float32 master weights and optimizer state, cast to
bfloat16 inside the loss: the usual mixed-precision recipe). On a GPU, `tie` serves the shared
FFN with the fused kernel in bfloat16 and mixed (the Mosaic GPU kernels take 16-bit dtypes);
the script prints what served it. Training shows a progress bar when `tqdm` is installed.
"""

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

import tietransform as tt


# -- the model --------------------------------------------------------------------------------


def _dense(key: PRNGKeyArray, fan_in: int, fan_out: int) -> tuple[Array, Array]:
    """A `(fan_in, fan_out)` weight with variance `1/fan_in`, and a zero bias."""
    weight = jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(jnp.float32(fan_in))
    return weight, jnp.zeros((fan_out,))


class FFN(eqx.Module):
    """`gelu(x @ w1 + b1) @ w2 + b2` on a `(seq, width)` array: the form the fused kernel serves."""

    w1: Float[Array, "width hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden width"]
    b2: Float[Array, " width"]

    def __init__(self, width: int, hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.w1, self.b1 = _dense(k1, width, hidden)
        self.w2, self.b2 = _dense(k2, hidden, width)

    def __call__(self, x: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        hidden = jax.nn.gelu(x @ self.w1 + self.b1[None, :])
        return hidden @ self.w2 + self.b2[None, :]


class Attention(eqx.Module):
    """Pre-norm causal multi-head self-attention, with the pre-norm of the FFN that follows it."""

    norm: eqx.nn.LayerNorm
    qkv: Float[Array, "width 3*width"]
    out: Float[Array, "width width"]
    ffn_norm: eqx.nn.LayerNorm
    heads: int = eqx.field(static=True)

    def __init__(self, width: int, heads: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm = eqx.nn.LayerNorm(width)
        self.qkv = _dense(k1, width, 3 * width)[0]
        self.out = _dense(k2, width, width)[0]
        self.ffn_norm = eqx.nn.LayerNorm(width)
        self.heads = heads

    def __call__(self, x: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        seq, width = x.shape
        qkv = jax.vmap(self.norm)(x) @ self.qkv
        q, k, v = (a.reshape(seq, self.heads, -1) for a in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(width // self.heads)
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        weights = jax.nn.softmax(jnp.where(causal[None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq, width) @ self.out


class Blocks(eqx.Module):
    """The `n` repetitions: every array leaf has a leading axis of size `n`."""

    attn: Attention
    mlp: FFN


def _repetition(h: Float[Array, "seq width"], block: Blocks) -> Float[Array, "seq width"]:
    h = h + block.attn(h)
    return h + block.mlp(jax.vmap(block.attn.ffn_norm)(h))


class UniversalTransformer(eqx.Module):
    """Token and position embeddings, `n` scanned repetitions, a final norm and a linear head."""

    embed: eqx.nn.Embedding
    position: Float[Array, "seq width"]
    blocks: Blocks
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self, *, n: int, width: int, seq: int, vocab: int, classes: int, key: PRNGKeyArray
    ):
        heads, hidden = max(width // 16, 1), 4 * width
        k_embed, k_pos, k_attn, k_mlp, k_head = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(vocab, width, key=k_embed)
        self.position = 0.02 * jax.random.normal(k_pos, (seq, width))
        # Stacked per-repetition weights, written as if nothing were tied: n attentions, n FFNs.
        attn_keys, mlp_keys = jax.random.split(k_attn, n), jax.random.split(k_mlp, n)
        attn = eqx.filter_vmap(lambda k: Attention(width, heads, key=k))(attn_keys)
        mlp = eqx.filter_vmap(lambda k: FFN(width, hidden, key=k))(mlp_keys)
        self.blocks = Blocks(attn, mlp)
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, classes, key=k_head)

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq classes"]:
        h = jax.vmap(self.embed)(tokens) + self.position
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def step(h: Array, block_params: Blocks) -> tuple[Array, None]:
            return _repetition(h, eqx.combine(block_params, static)), None

        h, _ = jax.lax.scan(step, h, params)
        return jax.vmap(lambda x: self.head(self.norm(x)))(h)


SPEC = tt.TieSpec(ffn=tt.stack("blocks.mlp"))
"""One FFN for all repetitions: every slice of `blocks.mlp` reads slice 0."""


def describe_ffn_backend(
    packed: "UniversalTransformer", tokens: Array, targets: Array, precision: "Precision"
) -> str:
    """Which implementation serves the shared FFN: traces the tied loss and reads
    `tt.ffn_routing_report` (on GPU/TPU `tie` routes the FFN to `kernels.ffn` by default)."""
    with tt.ffn_routing_report() as routed:
        eqx.filter_eval_shape(tied_loss_for(precision), packed, tokens, targets)
    if routed:
        return "; ".join(str(site) for site in routed)
    return (
        f"XLA on {jax.default_backend()}: one tied buffer read by every scan iteration "
        "(tt.tie(..., fuse_ffn=True) serves it with kernels.ffn in Pallas interpret mode)"
    )


# -- the task ---------------------------------------------------------------------------------


def addition_batch(
    key: PRNGKeyArray, batch: int, digits: int, p_nine: float = 0.35
) -> tuple[Int[Array, "batch seq"], Int[Array, "batch seq"]]:
    """Random `digits`-digit additions, least significant digit first.

    **Returns:** `(tokens, targets)`, each `(batch, digits + 1)`: token `10 * a_i + b_i` (the last
    position pads with `0 + 0`), target digit `i` of `a + b`. With probability `p_nine` a pair sums
    to 9, which lengthens carry chains.
    """
    k_a, k_b, k_nine = jax.random.split(key, 3)
    a = jax.random.randint(k_a, (batch, digits), 0, 10)
    nine = jax.random.bernoulli(k_nine, p_nine, (batch, digits))
    b = jnp.where(nine, 9 - a, jax.random.randint(k_b, (batch, digits), 0, 10))
    a, b = (jnp.pad(x, ((0, 0), (0, 1))) for x in (a, b))
    pair = a + b

    def carry_step(carry: Array, s: Array) -> tuple[Array, Array]:
        total = s + carry
        return total // 10, total % 10

    _, sums = jax.lax.scan(carry_step, jnp.zeros((batch,), a.dtype), pair.T)
    return 10 * a + b, sums.T


# -- training ---------------------------------------------------------------------------------


Precision = Literal["float32", "bfloat16", "mixed"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "mixed")


def cast_floats(tree, dtype):
    """Every floating array leaf of `tree` in `dtype` (other leaves as they are)."""

    def cast(leaf):
        if eqx.is_inexact_array(leaf):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


def loss_fn(
    model: UniversalTransformer, tokens: Int[Array, "batch seq"], targets: Int[Array, "batch seq"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean cross-entropy over all digits, and digit accuracy (as aux), written untied.

    Computes in the model's dtype; the cross-entropy is taken in float32."""
    logits = jax.vmap(model)(tokens).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return loss, accuracy


def mixed_loss_fn(
    model: UniversalTransformer, tokens: Int[Array, "batch seq"], targets: Int[Array, "batch seq"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`loss_fn` on float32 master weights cast to bfloat16 here, inside the loss: gradients
    come back in float32, through the casts."""
    return loss_fn(cast_floats(model, jnp.bfloat16), tokens, targets)


tied_loss = tt.tie(loss_fn, SPEC)
"""`loss_fn` on packed params: every repetition reads the one FFN."""
tied_mixed_loss = tt.tie(mixed_loss_fn, SPEC)
"""`mixed_loss_fn` on packed params: the cast of the stacked FFN stays one buffer (per slice)."""


def tied_loss_for(precision: Precision) -> Callable:
    """The tied loss a precision trains: bfloat16 keeps bfloat16 params, mixed casts float32
    ones."""
    return tied_mixed_loss if precision == "mixed" else tied_loss


# -- many devices -----------------------------------------------------------------------------


ParamSharding = Literal["replicated", "fsdp"]


def data_mesh(devices: int) -> Mesh:
    """A one-axis mesh `("data",)` over the first `devices` visible devices (auto sharding)."""
    available = jax.devices()
    if not 1 <= devices <= len(available):
        raise ValueError(f"--devices must be in 1..{len(available)} here, got {devices}.")
    return Mesh(np.array(available[:devices]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def param_spec(shape: tuple[int, ...], devices: int, param_sharding: ParamSharding) -> P:
    """`P()` (replicated), or for FSDP the largest axis of `shape` that `devices` divides.

    Zero-size leaves (the layout records of packed placeholders, `(0, k1, k2, k3)`) hold no data
    and stay replicated: a jitted step returns them so, and the next call reuses its program."""
    if param_sharding == "replicated" or math.prod(shape) == 0:
        return P()
    fits = [i for i, size in enumerate(shape) if size % devices == 0 and size >= devices]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: shape[i])
    return P(*(None,) * axis, "data")


def place(tree, mesh: Mesh, param_sharding: ParamSharding, *, traced: bool = False):
    """Every array leaf of `tree` (packed params, their optimizer state) put on `mesh`.

    `traced=True` inside `jit`: constrains the leaves instead, so that the step returns them as
    they came in (and the next call reuses the compiled step)."""
    devices = mesh.shape["data"]

    def put(leaf):
        if not eqx.is_array(leaf):
            return leaf
        sharding = NamedSharding(mesh, param_spec(leaf.shape, devices, param_sharding))
        if traced:
            return jax.lax.with_sharding_constraint(leaf, sharding)
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, tree)


@dataclasses.dataclass
class Metrics:
    """What `train` measured. `losses`/`accuracies` are per logged step (`steps_logged`)."""

    steps_logged: list[int]
    losses: list[float]
    accuracies: list[float]
    heldout_accuracy: float
    heldout_exact: float
    seconds: float
    packed: UniversalTransformer


def make_step(
    optimizer: optax.GradientTransformation,
    batch: int,
    digits: int,
    precision: Precision = "float32",
    mesh: Mesh | None = None,
    param_sharding: ParamSharding = "replicated",
    objective: Callable | None = None,
) -> Callable:
    """The jitted training step `(packed, opt_state, key) -> (packed, opt_state, loss, acc)`.

    With a `mesh`, the batch is drawn split over its `"data"` axis (call the step under
    `jax.set_mesh(mesh)`) and the params and optimizer state come back placed as
    `place(..., param_sharding)` put them. `objective` defaults to the precision's tied loss."""
    objective = objective or tied_loss_for(precision)

    @eqx.filter_jit
    def step(packed, opt_state, key):
        tokens, targets = addition_batch(key, batch, digits)
        if mesh is not None:
            tokens, targets = jax.lax.with_sharding_constraint(
                (tokens, targets), NamedSharding(mesh, P("data"))
            )
        loss_and_grad = eqx.filter_value_and_grad(objective, has_aux=True)
        (loss, accuracy), grads = loss_and_grad(packed, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(packed, eqx.is_array))
        packed = eqx.apply_updates(packed, updates)
        if mesh is not None:
            packed, opt_state = place((packed, opt_state), mesh, param_sharding, traced=True)
        return packed, opt_state, loss, accuracy

    return step


@eqx.filter_jit
def evaluate(
    packed: UniversalTransformer,
    key: PRNGKeyArray,
    batch: int,
    digits: int,
    compute_dtype: jnp.dtype = jnp.dtype(jnp.float32),
) -> tuple[Array, Array]:
    """Held-out digit accuracy and exact-match accuracy (every digit of the sum right)."""
    tokens, targets = addition_batch(key, batch, digits)
    packed = cast_floats(packed, compute_dtype)
    logits = tt.tie(lambda model, x: jax.vmap(model)(x), SPEC)(packed, tokens)
    correct = jnp.argmax(logits, axis=-1) == targets
    exact = jnp.all(correct, axis=-1)
    return jnp.mean(correct.astype(jnp.float32)), jnp.mean(exact.astype(jnp.float32))


def build(n: int, width: int, digits: int, key: PRNGKeyArray) -> UniversalTransformer:
    """The untied model: `n` repetitions, each with its own attention and its own FFN."""
    return UniversalTransformer(n=n, width=width, seq=digits + 1, vocab=100, classes=10, key=key)


@eqx.filter_jit
def _build_jitted(n: int, width: int, digits: int, key: PRNGKeyArray) -> UniversalTransformer:
    """`build`, compiled as one program: faster than initialising op by op on CPU."""
    return build(n, width, digits, key)


def train(
    *,
    n: int = 4,
    width: int = 64,
    digits: int = 8,
    steps: int = 1500,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 50,
    precision: Precision = "float32",
    devices: int = 1,
    param_sharding: ParamSharding = "replicated",
    progress: bool = False,
    verbose: bool = False,
) -> Metrics:
    """Train the tied Universal Transformer on addition; return the metrics and the packed model.

    `precision`, `devices`, `param_sharding`: see the module docstring."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if batch % devices:
        raise ValueError(f"--batch ({batch}) must be a multiple of --devices ({devices}).")
    mesh = data_mesh(devices) if devices > 1 else None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(
            n,
            width,
            digits,
            steps,
            batch,
            lr,
            seed,
            log_every,
            precision,
            mesh,
            param_sharding,
            progress,
            verbose,
        )


def _train(
    n,
    width,
    digits,
    steps,
    batch,
    lr,
    seed,
    log_every,
    precision,
    mesh,
    param_sharding,
    progress,
    verbose,
) -> Metrics:
    k_model, k_train, k_eval = jax.random.split(jax.random.key(seed), 3)
    packed = tt.pack(_build_jitted(n, width, digits, k_model), SPEC)
    if precision == "bfloat16":
        packed = cast_floats(packed, jnp.bfloat16)
    compute_dtype = jnp.dtype(jnp.float32 if precision == "float32" else jnp.bfloat16)
    if verbose:
        print(tt.describe(packed, SPEC))
        sample = addition_batch(k_eval, 2, digits)
        print(f"FFN served by: {describe_ffn_backend(packed, *sample, precision)}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(eqx.filter(packed, eqx.is_array))
    if mesh is not None:
        packed, opt_state = place((packed, opt_state), mesh, param_sharding)
    step = make_step(optimizer, batch, digits, precision, mesh, param_sharding)
    logged: tuple[list[int], list[float], list[float]] = ([], [], [])
    bar = _progress_bar(steps) if progress else None
    if verbose:
        print(f"compiling the {precision} training step (the first step waits for it)...")
    start = time.perf_counter()
    for i, key in enumerate(jax.random.split(k_train, steps)):
        packed, opt_state, loss, accuracy = step(packed, opt_state, key)
        if i % log_every == 0 or i == steps - 1:
            logged[0].append(i)
            logged[1].append(float(loss))
            logged[2].append(float(accuracy))
            if bar is not None:
                bar.set_postfix(loss=f"{logged[1][-1]:.3f}", acc=f"{logged[2][-1]:.3f}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    heldout, exact = evaluate(packed, k_eval, 4096, digits, compute_dtype)
    seconds = time.perf_counter() - start
    return Metrics(*logged, float(heldout), float(exact), seconds, packed)


def _progress_bar(steps: int):
    """A tqdm bar, or None (training without one) when tqdm is not installed."""
    try:
        from tqdm import tqdm  # only for the progress bar; the example trains without it
    except ImportError:
        print(f"training {steps} steps (install tqdm for a progress bar)")
        return None
    return tqdm(total=steps, desc="train", unit="step")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="repetitions (one shared FFN)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--digits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32 (default), bfloat16, or mixed (float32 weights, bfloat16 compute)",
    )
    parser.add_argument(
        "--devices", type=int, default=1, help="split the batch over this many devices"
    )
    parser.add_argument(
        "--param-sharding",
        choices=("replicated", "fsdp"),
        default="replicated",
        help="with --devices > 1: replicate the parameters, or shard them (FSDP)",
    )
    args = parser.parse_args()
    if args.n < 2:
        parser.error("--n must be at least 2: with one repetition there is nothing to share.")
    device = jax.devices()[0].device_kind
    placement = f"{args.devices} devices, {args.param_sharding} params" if args.devices > 1 else ""
    print(
        f"jax {jax.__version__} on {device}; {args.n} repetitions, width {args.width}, "
        f"{args.precision}" + (f"; {placement}" if placement else "")
    )
    metrics = train(**vars(args), progress=True, verbose=True)
    print(f"training loss {metrics.losses[0]:.3f} -> {metrics.losses[-1]:.4f}")
    print(
        f"held-out digit accuracy {metrics.heldout_accuracy:.3f} (chance 0.100), every digit right "
        f"{metrics.heldout_exact:.3f}; {metrics.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()

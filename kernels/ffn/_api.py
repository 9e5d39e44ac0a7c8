"""Public entry points `ffn` and `gated_ffn`, and dispatch between implementations."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..._errors import warn_once
from . import _pallas_gpu, _pallas_tpu, _sharded
from ._config import TuningConfig, default_config
from ._problem import Activation, Gated, Hidden, HiddenFn
from ._reference import problem_reference, problem_reference_remat
from ._validate import SUPPORTED_DTYPES, check_ffn_args
from ._vjp import KernelPlan, fused_ffn


__all__ = ["Implementation", "KernelFamily", "Support", "ffn", "ffn_support", "gated_ffn"]

Implementation = Literal["auto", "pallas", "interpret", "xla", "xla_remat"]
"""What `ffn`/`gated_ffn` run; `typing.get_args(Implementation)` lists them."""
KernelFamily = Literal["gpu", "tpu"]
_IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)



def _family_and_interpret(implementation: str, backend: str | None):
    platform = jax.default_backend()
    if implementation == "pallas":
        if platform not in ("gpu", "tpu"):
            raise ValueError(
                f'implementation="pallas" needs a GPU or TPU, but JAX\'s backend is {platform!r}.\n'
                'Use implementation="interpret" to run the Pallas kernels on CPU, or "auto".'
            )
        return backend or platform, False
    family = backend or "tpu"
    if family == "gpu":
        return family, _pallas_gpu.interpret_params()
    # The TPU-style kernels under the generic interpreter unless the TPU one is asked for.
    return family, (True if backend is None else _pallas_tpu.interpret_params())


def _plan(
    phi: HiddenFn, x, ws, w_out, implementation, backend, block_m, block_h, config=None
) -> KernelPlan:
    family, interpret = _family_and_interpret(implementation, backend)
    tokens, hidden = x.shape[0], ws[0].shape[1]
    if family == "gpu":
        compiled = interpret is False
        if config is None:
            config = default_config(tokens, x.shape[1], hidden, len(ws))
        _pallas_gpu.check_supported(x, ws, w_out, compiled=compiled, config=config)
        blocks = _pallas_gpu.gpu_blocks(
            tokens, hidden, len(ws), block_m, block_h, compiled=compiled, config=config
        )
        # The blocks as run (block_m/block_h arguments and compiled rounding applied).
        config = dataclasses.replace(config, block_m=blocks.block_m, block_h=blocks.block_h)
        _pallas_gpu.check_shared_memory(x, ws, w_out, config)
        return KernelPlan(phi, blocks, _pallas_gpu.forward, _pallas_gpu.backward, interpret, config)
    if family == "tpu":
        blocks = _pallas_tpu.tpu_blocks(tokens, hidden, x.dtype, block_m, block_h)
        return KernelPlan(phi, blocks, _pallas_tpu.forward, _pallas_tpu.backward, interpret)
    raise ValueError(f'backend must be "gpu", "tpu" or None; got {family!r}.')


def _check_block(fn_name: str, name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{fn_name}: `{name}` must be a positive int or None, got {value!r}.\n"
            f"Pass e.g. `{name}=64`, or None for the backend's default."
        )


def _check_config(fn_name: str, config: object) -> None:
    if config is not None and not isinstance(config, TuningConfig):
        raise TypeError(
            f"{fn_name}: `config` must be a kernels.TuningConfig or None, got "
            f"{type(config).__name__}.\nBuild one with e.g. `TuningConfig(stages=4)` or use "
            "`kernels.CONFIGS['pipelined']`."
        )


def _resolve(fn_name: str, implementation: str) -> str:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"{fn_name}: unknown implementation {implementation!r}; expected one of "
            f"{', '.join(map(repr, _IMPLEMENTATIONS))}."
        )
    if implementation == "auto":
        return "xla" if jax.default_backend() == "cpu" else "pallas"
    return implementation


class Support(NamedTuple):
    """What serves an FFN call: `implementation` is what runs (`"pallas"`, `"interpret"`,
    `"xla"` or `"xla_remat"`; `"auto"` resolved); `reason` says why the Pallas kernel cannot
    serve the call (it then falls back to `"xla"`), or is `None`."""

    implementation: str
    reason: str | None


def ffn_support(
    x: Any,
    ws: tuple[Any, ...],
    w_out: Any,
    *,
    biases: tuple[Any, ...] = (),
    implementation: Implementation = "auto",
    backend: KernelFamily | None = None,
    config: TuningConfig | None = None,
) -> Support:
    """Which implementation `ffn`/`gated_ffn` would run for arguments of these shapes and dtypes.

    **Arguments:** `x` `(..., d)`, `ws` the input projections `(d, hidden)` (one for `ffn`, two
    for `gated_ffn`), `w_out` `(hidden, d_out)`, `biases` any biases (or `None`s); anything with
    `.shape` and `.dtype` (arrays, `jax.ShapeDtypeStruct`, avals). `implementation`, `backend`
    as in [`kernels.ffn`][].

    These are the kernels' own rules, the ones the dispatcher applies: the Pallas kernels take
    one dtype among [`kernels.SUPPORTED_DTYPES`][]; the Mosaic GPU kernels (`"pallas"` on a GPU,
    or `backend="gpu"`) take bfloat16/float16 only, `d` and `d_out` multiples of 64 (bfloat16;
    one 128-byte swizzle row), `hidden` a multiple of 128 (64 gated), and compiled, a Hopper
    (sm_90) GPU; a `config` whose tile does not fit in shared memory, or that needs a Mosaic
    GPU feature the installed JAX lacks, is not served either. Used by `tie(..., fuse_ffn=...)`
    to route only what a kernel serves.
    """
    name = "gated_ffn" if len(ws) == 2 else "ffn"
    _check_config(name, config)
    resolved = _resolve(name, implementation)
    if resolved in ("xla", "xla_remat"):
        return Support(resolved, None)
    operands = [x, *ws, w_out, *(b for b in biases if b is not None)]
    dtypes = sorted({jnp.dtype(a.dtype).name for a in operands})
    if len(dtypes) != 1:
        return Support("xla", f"its operands mix dtypes ({', '.join(dtypes)})")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        return Support("xla", f"{dtypes[0]} is not a kernel dtype (float32, bfloat16, float16)")
    x2 = jax.ShapeDtypeStruct((math.prod(x.shape[:-1]), x.shape[-1]), x.dtype)
    try:
        _plan(Hidden(jax.nn.relu), x2, ws, w_out, resolved, backend, None, None, config)
    except NotImplementedError as e:
        return Support("xla", str(e))
    return Support(resolved, None)


def _dispatch(
    fn_name, phi, x, ws, bs, w_out, b_out, implementation, backend, block_m, block_h, config
):
    _check_config(fn_name, config)
    implementation = _resolve(fn_name, implementation)
    _check_block(fn_name, "block_m", block_m)
    _check_block(fn_name, "block_h", block_h)
    lead = x.shape[:-1]
    if implementation in ("pallas", "interpret"):
        axes = _sharded.token_axes(x) if x.ndim >= 2 else ()
        n = _sharded.shards(axes) if axes else 1
        if x.shape[0] % n:
            warn_once(
                f"{fn_name}: x's leading axis ({x.shape[0]}) does not split into {n} shards over "
                f"the mesh axes {axes}; the kernel runs on the whole of x (gathered). Make the "
                "batch a multiple of the number of devices."
            )
            axes, n = (), 1
        local_tokens = math.prod(lead) // n
        try:
            _plan(
                phi,
                _rows(local_tokens, x),
                ws,
                w_out,
                implementation,
                backend,
                block_m,
                block_h,
                config,
            )
        except NotImplementedError as e:
            warn_once(
                f"{fn_name}: the Pallas kernel cannot serve this call ({e}); "
                "falling back to the XLA reference."
            )
        else:

            def fused(x, *operands):
                ws_, bs_, (w_out_, b_out_) = (
                    operands[: len(ws)],
                    operands[len(ws) : 2 * len(ws)],
                    operands[2 * len(ws) :],
                )
                x2 = x.reshape(-1, x.shape[-1])
                plan = _plan(
                    phi, x2, ws_, w_out_, implementation, backend, block_m, block_h, config
                )
                out: jax.Array = fused_ffn(plan, x2, tuple(ws_), tuple(bs_), w_out_, b_out_)
                return out.reshape(*x.shape[:-1], w_out_.shape[1])

            if axes:
                return _sharded.per_shard(fused, axes, x, *ws, *bs, w_out, b_out)
            return fused(x, *ws, *bs, w_out, b_out)
    x2 = x.reshape(-1, x.shape[-1])
    ref = problem_reference_remat if implementation == "xla_remat" else problem_reference
    return ref(phi, x2, ws, bs, w_out, b_out).reshape(*lead, w_out.shape[1])


def _rows(tokens: int, x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((tokens, x.shape[-1]), x.dtype)


def ffn(
    x: Float[Array, "*batch d"],
    w1: Float[Array, "d hidden"],
    b1: Float[Array, " hidden"] | None,
    w2: Float[Array, "hidden d_out"],
    b2: Float[Array, " d_out"] | None,
    *,
    activation: Activation = jax.nn.gelu,
    implementation: Implementation = "auto",
    backend: KernelFamily | None = None,
    block_m: int | None = None,
    block_h: int | None = None,
    config: TuningConfig | None = None,
) -> Float[Array, "*batch d_out"]:
    """The feed-forward block `activation(x @ w1 + b1) @ w2 + b2`, fused.

    **Arguments:**

    - `x`: `(..., d)`; leading axes are flattened to tokens.
    - `w1`, `b1`: `(d, hidden)` and `(hidden,)` (or `None`).
    - `w2`, `b2`: `(hidden, d_out)` and `(d_out,)` (or `None`).
    - `activation`: any elementwise function (`jax.nn.gelu`, `jax.nn.relu`, a lambda, ...);
      the kernels differentiate it with `jax.vjp`.
    - `implementation`: `"auto"` (Pallas on GPU/TPU, the XLA reference on CPU), `"pallas"`
      (compiled kernel), `"interpret"` (the kernels on CPU), `"xla"` (plain jnp reference),
      `"xla_remat"` (the reference under `jax.checkpoint`).
    - `backend`: which kernel family `"pallas"`/`"interpret"` use: `"gpu"` (Mosaic GPU,
      Hopper), `"tpu"` (Mosaic TPU; interpreted by `pltpu.InterpretParams`), or `None` (the
      platform's own; for `"interpret"` the TPU-style kernels under the generic interpreter).
    - `block_m`, `block_h`: token-block rows and hidden-chunk width, positive ints (defaults per
      backend). Each backend rounds them to a block it can run: the TPU kernels to multiples of
      8 rows (16 for 16-bit dtypes) and 128 columns; the Mosaic GPU kernels to a hidden chunk of
      whole 128-column tiles (64 gated) that divides `hidden` and, compiled, to multiples of 64
      rows (WGMMA's M). They override `config`'s `block_m`/`block_h`.
    - `config`: a `kernels.TuningConfig` for the Mosaic GPU kernels (tiles, stages,
      WGMMAs in flight, warp specialization, persistent grid); `None` for the default per
      shape class (`kernels.default_config`). Other implementations ignore it.

    All arguments share one dtype (float32, bfloat16 or float16); matmuls accumulate in float32
    and the hidden activation is rounded to that dtype before `w2`.

    **Returns:**

    `(..., d_out)` in `x.dtype`. Under `jax.grad`, the Pallas implementations save only the
    inputs and recompute the `tokens x hidden` activation blockwise in the backward.
    A shape or dtype a kernel cannot serve falls back to `"xla"` with a one-time warning;
    `kernels.ffn_support` says beforehand what will serve a call.
    """
    check_ffn_args("ffn", x, [("w1", w1)], [("b1", b1)], "w2", w2, "b2", b2)
    return _dispatch(
        "ffn",
        Hidden(activation),
        x,
        (w1,),
        (b1,),
        w2,
        b2,
        implementation,
        backend,
        block_m,
        block_h,
        config,
    )


def gated_ffn(
    x: Float[Array, "*batch d"],
    wg: Float[Array, "d hidden"],
    wu: Float[Array, "d hidden"],
    w2: Float[Array, "hidden d_out"],
    *,
    bg: Float[Array, " hidden"] | None = None,
    bu: Float[Array, " hidden"] | None = None,
    b2: Float[Array, " d_out"] | None = None,
    activation: Activation = jax.nn.silu,
    implementation: Implementation = "auto",
    backend: KernelFamily | None = None,
    block_m: int | None = None,
    block_h: int | None = None,
    config: TuningConfig | None = None,
) -> Float[Array, "*batch d_out"]:
    """The gated feed-forward block (SwiGLU by default), fused.

    Computes `(activation(x @ wg + bg) * (x @ wu + bu)) @ w2 + b2`; `wg`, `wu` are `(d, hidden)`,
    the biases optional. Every other argument and the numerics are as in [`kernels.ffn`][].
    """
    check_ffn_args(
        "gated_ffn", x, [("wg", wg), ("wu", wu)], [("bg", bg), ("bu", bu)], "w2", w2, "b2", b2
    )
    return _dispatch(
        "gated_ffn",
        Gated(activation),
        x,
        (wg, wu),
        (bg, bu),
        w2,
        b2,
        implementation,
        backend,
        block_m,
        block_h,
        config,
    )

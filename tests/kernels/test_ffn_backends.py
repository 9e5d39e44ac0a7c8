"""Each kernel family on CPU: the TPU and Mosaic GPU interpreters, and lowering for the real
platforms (which catches block-shape, layout and shared-memory errors without the device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import tietransform._errors
from tests.kernels.helpers import Problem, assert_close, scan_loss, tolerance
from tietransform.kernels import _compat
from tietransform.kernels.ffn import _pallas_gpu, _pallas_tpu, _vjp
from tietransform.kernels.ffn._problem import Gated, Hidden


@pytest.fixture(autouse=True)
def _on_cpu():
    """The interpreters run on the CPU device, whatever the machine (the Mosaic GPU interpreter
    models shared memory with host callbacks; float32 math at full precision)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _check_forward_and_gradients(data: Problem, n: int, **kw) -> None:
    params, x = data.params(), data.x()
    out = jax.jit(lambda p, x: data.apply(p, x, **kw))(params, x)
    ref_out = jax.jit(lambda p, x: data.apply(p, x, reference=True))(params, x)
    assert_close(out, ref_out, tolerance(data.dtype, grad=False), "forward")
    grads = jax.jit(jax.grad(scan_loss(data, n, **kw), argnums=(0, 1)))(params, x)
    ref = jax.jit(jax.grad(scan_loss(data, n, reference=True), argnums=(0, 1)))(params, x)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert_close(g, r, tolerance(data.dtype, grad=True), "gradient")


@pytest.mark.parametrize(("gated", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_tpu_kernels_under_the_tpu_interpreter_match_reference(gated, dtype):
    # Ragged tokens and hidden (40 = 2.5 blocks of 16; 200 = 1.6 chunks of 128), race detection on.
    # These are the BlockSpec'd kernels as compiled for TPU (the generic interpreter maps inputs
    # whole); bfloat16 accumulates in float32 VMEM scratch, float32 in the output blocks.
    data = Problem(40, 16, 200, dtype, "gelu", gated, True, 11)
    _check_forward_and_gradients(
        data, 2, implementation="interpret", backend="tpu", block_m=16, block_h=128
    )


@pytest.mark.parametrize("gated", [False, True])
def test_mosaic_gpu_kernels_under_the_gpu_interpreter_match_reference(gated, capfd, monkeypatch):
    # The default config (`legacy`; test_kernel_configs checks the others). 100 tokens: 1.6
    # blocks of 64 rows; hidden 256 in two chunks of 128. Race detection on: jax 0.12 raises on
    # a race, 0.10.2 prints "RACE DETECTED".
    monkeypatch.setattr(
        _pallas_gpu, "interpret_params", lambda: _compat.gpu_interpret_params(detect_races=True)
    )
    data = Problem(100, 64, 256, "bfloat16", "silu" if gated else "gelu", gated, True, 12)
    _check_forward_and_gradients(data, 2, implementation="interpret", backend="gpu", block_h=128)
    assert "RACE DETECTED" not in capfd.readouterr().out


def _lower_tpu_training_step(phi, dtype, tokens, d, hidden):
    k = phi.arity
    x = jax.ShapeDtypeStruct((tokens, d), dtype)
    ws = tuple(jax.ShapeDtypeStruct((d, hidden), dtype) for _ in range(k))
    bs = tuple(jax.ShapeDtypeStruct((hidden,), dtype) for _ in range(k))
    w2, b2 = jax.ShapeDtypeStruct((hidden, d), dtype), jax.ShapeDtypeStruct((d,), dtype)
    blocks = _pallas_tpu.tpu_blocks(tokens, hidden, dtype, None, None)
    plan = _vjp.KernelPlan(phi, blocks, _pallas_tpu.forward, _pallas_tpu.backward)

    def step(*args):
        loss = lambda *a: jnp.sum(_vjp.fused_ffn(plan, *a).astype(jnp.float32))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

    return _compat.lower_for(step, "tpu", x, ws, bs, w2, b2).as_text()


# The Mosaic GPU training step lowers for cuda at the benchmark shape in every config:
# test_kernel_configs.test_every_config_lowers_for_cuda_at_the_benchmark_shape.


@pytest.mark.parametrize("phi", [Hidden(jax.nn.gelu), Gated(jax.nn.silu)], ids=["ffn", "swiglu"])
def test_tpu_training_step_lowers_for_tpu_at_benchmark_shape(phi):
    text = _lower_tpu_training_step(phi, jnp.bfloat16, 512, 1024, 4096)
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("block_m", [16, 100])
def test_a_compiled_gpu_block_m_is_rounded_up_to_whole_wgmma_rows_and_lowers_for_cuda(block_m):
    # WGMMA's accumulator has 64-row multiples; Mosaic GPU rejects 16 at verification.
    blocks = _pallas_gpu.gpu_blocks(300, 256, 1, block_m, 64, compiled=True)
    assert blocks.block_m % 64 == 0 and blocks.block_m >= block_m and blocks.block_h == 128
    plan = _vjp.KernelPlan(Hidden(jax.nn.gelu), blocks, _pallas_gpu.forward, _pallas_gpu.backward)
    dt = jnp.bfloat16
    args = (
        jax.ShapeDtypeStruct((300, 64), dt),
        (jax.ShapeDtypeStruct((64, 256), dt),),
        (None,),
        jax.ShapeDtypeStruct((256, 64), dt),
        None,
    )

    def step(x, ws, w_out):
        loss = lambda *a: jnp.sum(_vjp.fused_ffn(plan, a[0], a[1], (None,), a[2], None))  # noqa: E731
        return jax.grad(lambda *a: loss(*a).astype(jnp.float32), argnums=(0, 1, 2))(x, ws, w_out)

    text = _compat.lower_for(step, "cuda", args[0], args[1], args[3]).as_text()
    assert "mosaic_gpu" in text


def test_gpu_kernels_fall_back_with_one_warning_for_float32():

    tietransform._errors.reset_warnings()
    data = Problem(32, 64, 128, "float32", "gelu", False, True, 13)
    params, x = data.params(), data.x()
    with pytest.warns(RuntimeWarning, match="cannot serve this call"):
        out = data.apply(params, x, implementation="interpret", backend="gpu")
    # Once only: a second call with the same reason is silent (filterwarnings=error would raise).
    again = data.apply(params, x, implementation="interpret", backend="gpu")
    ref = data.apply(params, x, reference=True)
    assert_close(out, ref, 0.0)
    assert_close(again, ref, 0.0)


def test_gpu_interpret_params_come_from_the_installed_jax():
    params = _compat.gpu_interpret_params()
    assert type(params).__name__ == "InterpretGPUParams"

"""The Mosaic GPU kernels' tuning configs: the dataclass's contract, every named config against the
reference under the Mosaic GPU interpreter (race detection on) and lowered for `cuda`, and the
dispatcher's default read from the committed device table.

Under the `ci` hypothesis profile (the default) each config runs one small problem, plain and
gated; the `dev` profile (`TIETRANSFORM_HYPOTHESIS_PROFILE=dev`) adds drawn problems per config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import hypothesis
import jax
import jax.numpy as jnp
import pytest
from hypothesis import strategies as st

from tests.kernels.helpers import ACTIVATIONS, Problem, assert_close, scan_loss, tolerance
from tietransform import kernels
from tietransform.kernels import _compat
from tietransform.kernels.ffn import CONFIGS, TuningConfig, _pallas_gpu, _vjp, default_config
from tietransform.kernels.ffn._problem import Gated, Hidden


_RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_DEV = os.environ.get("TIETRANSFORM_HYPOTHESIS_PROFILE", "ci") == "dev"


@pytest.fixture(autouse=True)
def _on_cpu():
    """The interpreter runs on the CPU device, whatever the machine."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _interpreted(name: str) -> TuningConfig:
    # One program for the persistent grid, so it loops over both tiles of the test shapes (and
    # both epilogue buffers).
    config = CONFIGS[name]
    return dataclasses.replace(config, num_sms=1) if config.persistent else config


def _check_against_reference(data: Problem, config: TuningConfig, capfd) -> None:
    """Forward and every gradient of one scan iteration `x + ffn(x)`, interpreted with race
    detection (jax 0.12 raises on a race; 0.10.2 prints "RACE DETECTED" and goes on)."""
    kw = dict(implementation="interpret", backend="gpu", block_h=data.hidden, config=config)
    params, x = data.params(), data.x()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            _pallas_gpu, "interpret_params", lambda: _compat.gpu_interpret_params(detect_races=True)
        )
        step = jax.value_and_grad(scan_loss(data, 1, aux=True, **kw), (0, 1), has_aux=True)
        (_, out), grads = jax.jit(step)(params, x)
    ref_step = jax.value_and_grad(
        scan_loss(data, 1, aux=True, reference=True), (0, 1), has_aux=True
    )
    (_, ref_out), ref = jax.jit(ref_step)(params, x)
    assert "RACE DETECTED" not in capfd.readouterr().out
    assert_close(out - x, ref_out - x, tolerance(data.dtype, grad=False), "forward")
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert_close(g, r, tolerance(data.dtype, grad=True), "gradient")


def _problem(name: str, gated: bool) -> Problem:
    # 40 tokens: one ragged 64-row block; d = 128: two K steps of 64, so a WGMMA stays in flight
    # (a one-step pipeline keeps none). Hidden: one tile of the config's width (128; the
    # warp-specialized configs 2 x 64) in one chunk, two for the persistent grid (one program
    # looping over both). Plain with biases, gated without (the Mosaic GPU interpreter of
    # jax 0.10.2 takes ~5 s per warp-specialized program, so CI runs one small problem).
    hidden = 256 if CONFIGS[name].persistent else 128
    if gated:
        return Problem(40, 128, hidden, "bfloat16", "silu", gated=True, biases=False, seed=22)
    return Problem(40, 128, hidden, "bfloat16", "gelu", gated=False, biases=True, seed=21)


# `legacy` (the default config) is checked by test_ffn_backends' Mosaic GPU interpreter test on a
# larger problem (two token blocks, two hidden chunks, a scan of two iterations, races detected).
_NEW_CONFIGS = sorted(set(CONFIGS) - {"legacy"})


@pytest.mark.parametrize("name", _NEW_CONFIGS)
def test_every_config_runs_a_plain_ffn_with_biases_like_the_reference_in_a_scan(name, capfd):
    _check_against_reference(_problem(name, gated=False), _interpreted(name), capfd)


@pytest.mark.parametrize("name", _NEW_CONFIGS)
def test_every_config_runs_a_gated_ffn_without_biases_like_the_reference_in_a_scan(name, capfd):
    _check_against_reference(_problem(name, gated=True), _interpreted(name), capfd)


@st.composite
def _gpu_problems(draw) -> Problem:
    gated = draw(st.booleans())
    return Problem(
        tokens=draw(st.integers(1, 200)),
        d=draw(st.sampled_from([64, 128])),
        hidden=draw(st.sampled_from([128, 256])),
        dtype=draw(st.sampled_from(["bfloat16", "float16"])),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        gated=gated,
        biases=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


@pytest.mark.skipif(not _DEV, reason="drawn problems per config run under the dev profile")
@pytest.mark.parametrize("name", sorted(CONFIGS))
@hypothesis.settings(suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=_gpu_problems())
def test_every_config_matches_the_reference_on_drawn_problems(name, data, capfd):
    _check_against_reference(data, _interpreted(name), capfd)


def _lower_step(phi, config: TuningConfig, tokens=512, d=1024, hidden=4096) -> str:
    k, dt = phi.arity, jnp.bfloat16
    x = jax.ShapeDtypeStruct((tokens, d), dt)
    ws = tuple(jax.ShapeDtypeStruct((d, hidden), dt) for _ in range(k))
    bs = tuple(jax.ShapeDtypeStruct((hidden,), dt) for _ in range(k))
    w2, b2 = jax.ShapeDtypeStruct((hidden, d), dt), jax.ShapeDtypeStruct((d,), dt)
    _pallas_gpu.check_supported(x, ws, w2, compiled=False, config=config)
    _pallas_gpu.check_shared_memory(x, ws, w2, config)
    blocks = _pallas_gpu.gpu_blocks(tokens, hidden, k, None, None, compiled=True, config=config)
    plan = _vjp.KernelPlan(phi, blocks, _pallas_gpu.forward, _pallas_gpu.backward, False, config)

    def loss(*args):
        out: jax.Array = _vjp.fused_ffn(plan, *args)
        return jnp.sum(out.astype(jnp.float32))

    def step(*args):
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

    return _compat.lower_for(step, "cuda", x, ws, bs, w2, b2).as_text()


@pytest.mark.parametrize("phi", [Hidden(jax.nn.gelu), Gated(jax.nn.silu)], ids=["ffn", "swiglu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_lowers_for_cuda_at_the_benchmark_shape(name, phi):
    # Mosaic GPU's lowering rejects a kernel whose shared memory exceeds the SM's 227 KiB, so
    # this also checks the stage counts the configs fit into.
    assert "mosaic_gpu" in _lower_step(phi, CONFIGS[name])


def test_tuning_config_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        TuningConfig(64)  # type: ignore[misc]


def test_tuning_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TuningConfig.legacy().stages = 3  # type: ignore[misc]


def test_the_legacy_config_is_the_kernel_before_tuning_configs():
    legacy = TuningConfig.legacy()
    assert CONFIGS["legacy"] == legacy
    assert (legacy.block_m, legacy.tile_n(1), legacy.tile_n(2), legacy.stages) == (64, 128, 64, 2)
    assert legacy.wgmmas_in_flight == 0
    assert not (legacy.share_lhs or legacy.warp_specialized or legacy.persistent)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"stages": 0}, "`stages` must be a positive int"),
        ({"block_m": True}, "`block_m` must be a positive int"),
        ({"wgmmas_in_flight": 2}, "`wgmmas_in_flight` must be 0 or 1"),
        ({"stages": 1, "wgmmas_in_flight": 1}, r"`stages` \(1\) must exceed"),
        ({"warp_specialized": True, "compute_wgs": 3}, "`compute_wgs` must be 1 or 2"),
        ({"block_n": -64}, "`block_n` must be a positive int or None"),
    ],
)
def test_an_invalid_tuning_config_is_refused_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        TuningConfig(**fields)


def test_a_config_needing_a_feature_the_installed_jax_lacks_is_refused_naming_both(monkeypatch):
    monkeypatch.setitem(
        _compat._GPU_FEATURES, "plgpu.emit_pipeline_warp_specialized", lambda: False
    )
    x = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    w1 = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    w2 = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16)
    support = kernels.ffn_support(
        x, (w1,), w2, implementation="interpret", backend="gpu", config=CONFIGS["warp_specialized"]
    )
    assert support.implementation == "xla"
    assert "plgpu.emit_pipeline_warp_specialized" in str(support.reason)
    assert f"jax {jax.__version__}" in str(support.reason)


def test_a_config_whose_tile_exceeds_shared_memory_is_not_served():
    # (256, 2 x 256) tiles: the backward's buffers need far more than an SM's shared memory.
    big = TuningConfig(block_m=256, block_n=256, warp_specialized=True)
    x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
    w1 = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16)
    w2 = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)
    support = kernels.ffn_support(
        x, (w1,), w2, implementation="interpret", backend="gpu", config=big
    )
    assert support.implementation == "xla"
    assert "shared memory" in str(support.reason)


def test_config_must_be_a_tuning_config():
    data = _problem("legacy", gated=False)
    with pytest.raises(TypeError, match="`config` must be a kernels.TuningConfig"):
        data.apply(data.params(), data.x(), implementation="xla", config={"stages": 4})


def test_the_default_config_is_the_fastest_measured_config_of_the_committed_device_tables():
    tables = sorted(_RESULTS.glob("ffn_device*.json"))
    assert tables, "benchmarks/results/ffn_device*.json (the device script's tables) are missing"
    rows = [r for t in tables for r in json.loads(t.read_text())["rows"]]
    measured = [r for r in rows if r.get("platform") == "gpu" and r.get("ms") is not None]
    for row in rows:
        if row.get("config") is None:
            continue
        case = (row["kind"], row["d"], row["hidden"], row["tokens"], row["n"])
        arity = 2 if row["kind"] == "gated_ffn" else 1
        chosen = default_config(row["tokens"], row["d"], row["hidden"], arity)
        same_case = [
            r
            for r in measured
            if r.get("config") is not None
            and (r["kind"], r["d"], r["hidden"], r["tokens"], r["n"]) == case
        ]
        if not same_case:  # nothing measured on a GPU: today's kernel stays the default.
            assert chosen == TuningConfig.legacy(), row
        else:
            fastest = min(same_case, key=lambda r: r["ms"])["config"]
            assert chosen == CONFIGS[fastest], (case, fastest)


def test_the_default_config_keeps_legacy_where_pipelined_was_not_measured_faster(monkeypatch):
    # Gated at the measured size and above: pipelined; plain at any size, gated below the measured
    # size (every interpreter test's shape), and gated on a JAX without delay_release: legacy.
    assert default_config(16384, 1024, 4096, 2) == CONFIGS["pipelined"]
    assert default_config(65536, 2048, 8192, 2) == CONFIGS["pipelined"]
    assert default_config(65536, 1024, 4096, 1) == TuningConfig.legacy()
    for tokens, d, hidden in [(8192, 1024, 4096), (16384, 512, 4096), (16384, 1024, 2048)]:
        assert default_config(tokens, d, hidden, 2) == TuningConfig.legacy()
    monkeypatch.setitem(_compat._GPU_FEATURES, "BlockSpec(delay_release=...)", lambda: False)
    assert default_config(16384, 1024, 4096, 2) == TuningConfig.legacy()


def _two_block_loss(params, x):
    """`h + relu(h @ w1 + b1) @ w2 + b2` for each of two blocks, applied in turn."""
    h = x
    for p in params["blocks"]:
        h = h + jax.nn.relu(h @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]
    return jnp.sum(h.astype(jnp.float32) ** 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_serves_a_tied_ffn_routed_from_tie_like_xla(name):
    """`tie(..., fuse_ffn="interpret", ffn_options=...)` runs the config's Mosaic GPU kernel for
    both blocks' shared FFN; values and gradients match the unrouted tie (XLA) in bfloat16.
    (A tie inside `lax.scan` over a stack checkpoints its body, which the interpreter's
    callbacks cannot go through on CPU; the compiled kernels have none.)"""
    tt = pytest.importorskip("tietransform")
    config = _interpreted(name)
    d, hidden = 128, 256 if config.persistent else 128
    keys = jax.random.split(jax.random.key(3), 5)
    ffn = {
        "w1": jax.random.normal(keys[0], (d, hidden)) / d**0.5,
        "b1": jax.random.normal(keys[1], (hidden,)) / 4,
        "w2": jax.random.normal(keys[2], (hidden, d)) / hidden**0.5,
        "b2": jax.random.normal(keys[3], (d,)) / 4,
    }
    params = {"blocks": [jax.tree.map(lambda a: a.astype(jnp.bfloat16), ffn)] * 2}
    x = jax.random.normal(keys[4], (40, d)).astype(jnp.bfloat16)
    spec = tt.TieSpec(ffn="blocks[*]")
    packed = tt.pack(params, spec)
    options = {"backend": "gpu", "config": config, "block_h": hidden}
    routed = tt.tie(_two_block_loss, spec, fuse_ffn="interpret", ffn_options=options)
    plain = tt.tie(_two_block_loss, spec, fuse_ffn=False)
    with tt.ffn_routing_report() as sites:
        value, grads = jax.value_and_grad(routed)(packed, x)
    assert [s.served_by for s in sites] == ["kernels.ffn[interpret]"] * 2
    # The Mosaic GPU kernels (`mpmd_map`), not the TPU-style ones the CPU picks by default.
    assert str(jax.make_jaxpr(routed)(packed, x)).count("mpmd_map[") == 2
    ref_value, ref_grads = jax.value_and_grad(plain)(packed, x)
    assert_close(value, ref_value, tolerance(jnp.bfloat16, grad=False), "loss")
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert_close(g, r, tolerance(jnp.bfloat16, grad=True), "gradient")

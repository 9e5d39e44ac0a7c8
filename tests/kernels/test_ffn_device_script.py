"""The device script's dry run (`benchmarks/ffn_device.py --dry-run`): on CPU, kernels in the
Mosaic GPU interpreter, it checks each implementation against the reference and writes a table."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import pytest


_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "ffn_device.py"


@pytest.fixture(scope="module")
def ffn_device():
    spec = importlib.util.spec_from_file_location("ffn_device", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ffn_device"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ffn_device"]


def test_the_dry_run_checks_each_implementation_and_writes_a_json_and_markdown_table(
    ffn_device, tmp_path
):
    # One tiny shape, one storage, XLA and one kernel config (the committed dry run,
    # benchmarks/results/ffn_device_dry.*, covers every config).
    stem = tmp_path / "table"
    with jax.default_device(jax.devices("cpu")[0]):
        ffn_device.main(
            [
                "--dry-run",
                "--kinds",
                "ffn",
                "--storages",
                "bf16",
                "--only",
                "xla,kernel[pipelined]",
                "--out",
                str(stem),
            ]
        )
    table = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["impl"]: r for r in table["rows"]}
    assert set(rows) == {"xla", "kernel[pipelined]"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["kernel[pipelined]"]["interpreted"] is True
    # The bar is 4 x what perturbing the inputs by bf16's unit roundoff does: small at this size.
    tol = rows["xla"]["grad_tol"]
    assert 0 < tol < 5e-2
    assert all(r["grad_tol"] == tol and r["grad_err"] <= tol for r in rows.values()), rows
    assert "CPU DRY RUN" in stem.with_suffix(".md").read_text()


def test_a_gradient_beyond_the_rounding_bar_is_wrong_and_not_timed(ffn_device):
    shape = ffn_device.Shape("ffn", 40, 2, 128, 128)
    with jax.default_device(jax.devices("cpu")[0]):
        ref = ffn_device._step(shape, "reference", "bf16", interpret=True, chunk=128)
        params = {k: v.astype(jnp.bfloat16) for k, v in ffn_device._params(shape).items()}
        x = jax.random.normal(jax.random.key(1), (40, 128))
        _, ref_grads = ref(jax.tree.map(lambda v: v.astype(jnp.float32), params), x)
        off = jax.tree.map(lambda g: g * 1.1, ref_grads)  # 10% off: far beyond bf16 rounding
        kw = dict(steps=1, warmup=0, interpret=True, chunk=128, rounding_err=5e-3)
        row = ffn_device.run_row(shape, "xla", "bf16", ref_grads=off, **kw)
        assert row["status"].startswith("WRONG: gradients off by"), row
        assert row["ms"] is None
        assert ffn_device.run_row(shape, "xla", "bf16", ref_grads=ref_grads, **kw)["ms"]


def test_a_spent_budget_skips_the_rest_of_a_case_and_the_cases_after_it(
    ffn_device, tmp_path, monkeypatch
):
    # Each row costs 10 s of a fake clock; the budget (15 s) is spent after the second row.
    clock = [0.0]
    monkeypatch.setattr(ffn_device, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def row(shape, impl, storage, **_):
        clock[0] += 10.0
        case = dict(kind=shape.kind, tokens=shape.tokens, n=shape.n, storage=storage)
        return dict(case, impl=impl, status="ok", ms=1.0)

    monkeypatch.setattr(ffn_device, "run_row", row)
    stem = tmp_path / "table"
    with jax.default_device(jax.devices("cpu")[0]):
        ffn_device.main(["--dry-run", "--budget-s", "15", "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    got = [(r["kind"], r["storage"], r["impl"], r["status"]) for r in rows]
    skipped = "skipped: time budget spent"
    configs = [f"kernel[{name}]" for name in ffn_device.CONFIGS]
    assert got == [
        ("ffn", "f32->bf16", "xla", "ok"),
        ("ffn", "f32->bf16", "xla_remat", "ok"),
        *(("ffn", "f32->bf16", impl, skipped) for impl in ["xla_chunked", *configs]),
        ("ffn", "bf16", "*", skipped),
        ("gated_ffn", "f32->bf16", "*", skipped),
        ("gated_ffn", "bf16", "*", skipped),
    ]

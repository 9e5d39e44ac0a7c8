"""The device script's dry run (`benchmarks/ffn_device.py --dry-run`): on CPU, kernels in the
Mosaic GPU interpreter, it checks each implementation against the reference and writes a table."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
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
    assert rows["kernel[pipelined]"]["max_rel_err"] <= 5e-2
    assert "CPU DRY RUN" in stem.with_suffix(".md").read_text()

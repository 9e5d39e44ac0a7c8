"""Two processes on one host, joined by `jax.distributed` with one CPU device each, train a tied
model as one process does: the Many devices page's script (`docs/scripts/two_processes.py`), run
as a coordinator and one worker, against the same script in a single process.

The processes are real subprocesses talking over 127.0.0.1 on a free port; every wait is bounded,
and a hung run is killed and reported with what each process wrote to stderr.
"""

import contextlib
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import assert_trees_close


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "scripts" / "two_processes.py"
BATCH = 16  # the script's global batch: each gradient is a mean over 16 rows
TIMEOUT_S = 180  # each process: start-up, three compiled steps; ~10 s on an idle core

_COLLECTIVES = getattr(jax.config, "jax_cpu_collectives_implementation", None)
pytestmark = pytest.mark.skipif(
    _COLLECTIVES in (None, "none"),
    reason=f"this jax has no CPU collectives across processes "
    f"(jax_cpu_collectives_implementation={_COLLECTIVES!r}); jax.distributed cannot run on CPU",
)


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free a moment ago (held open together, so never the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _launch(
    num_processes: int, port: int, workdir: pathlib.Path
) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    address = f"127.0.0.1:{port}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",  # one device per process
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    runs = []
    for process_id in range(num_processes):
        cwd = workdir / f"{num_processes}-{process_id}"
        cwd.mkdir()
        command = [sys.executable, str(SCRIPT), str(process_id), str(num_processes), address]
        # Output goes to files: a pipe nobody reads while we wait could fill and block the process.
        with open(cwd / "stdout", "w") as out, open(cwd / "stderr", "w") as err:
            runs.append((subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err), cwd))
    return runs


def _finish(runs) -> list[str]:
    """Waits for every process, at most `TIMEOUT_S` in all; once one fails (the others would wait
    for it until JAX's own timeouts), kills the rest. Returns each process's stdout."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(proc.poll() is None for proc, _ in runs):
        failed = any(proc.poll() not in (None, 0) for proc, _ in runs)
        if failed or time.monotonic() > deadline:
            for proc, _ in runs:
                proc.kill()
            break
        time.sleep(0.1)
    for proc, _ in runs:
        proc.wait()
    report = "\n".join(
        f"--- process {i}: exit code {proc.returncode}\n{(cwd / 'stderr').read_text()[-3000:]}"
        for i, (proc, cwd) in enumerate(runs)
    )
    if any(proc.returncode != 0 for proc, _ in runs):
        pytest.fail(f"a process failed or ran past {TIMEOUT_S} s:\n{report}")
    return [(cwd / "stdout").read_text() for _, cwd in runs]


def _losses(stdout: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"loss (\S+)", stdout)], np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[str, pathlib.Path]]:
    """The script as a coordinator and a worker, and at the same time as one process with one
    device: {number of processes: (process 0's stdout, its working directory)}."""
    tmp = tmp_path_factory.mktemp("two_processes")
    two, one = _free_ports(2)
    two_out, _, one_out = _finish(_launch(2, two, tmp) + _launch(1, one, tmp))
    return {2: (two_out, tmp / "2-0"), 1: (one_out, tmp / "1-0")}


def test_two_processes_train_the_tied_model_to_the_params_one_process_trains(runs):
    (two_out, two_dir), (one_out, one_dir) = runs[2], runs[1]
    assert "2 processes, 2 devices" in two_out
    assert "1 processes, 1 devices" in one_out
    assert len(_losses(two_out)) == len(_losses(one_out)) == 3
    two, one = np.load(two_dir / "trained.npz"), np.load(one_dir / "trained.npz")
    assert sorted(two) == sorted(one)
    # float32. Across two processes each device sums its 8 rows and an all-reduce adds the two
    # partial sums: every gradient is the same 16 per-row terms added in another order, which
    # tolerance(float32, 16) bounds (4e-6 of each leaf's magnitude); seen: 4e-7 or less.
    assert_trees_close(_losses(two_out), _losses(one_out), summands=BATCH)
    assert_trees_close(dict(two), dict(one), summands=BATCH)


def test_the_many_devices_page_shows_what_the_two_processes_print(runs):
    page = (ROOT / "docs" / "distributed.md").read_text()
    shown = page.split("python two_processes.py 0 2 & python two_processes.py 1 2", 1)[1]
    shown = shown.split("```text\n", 1)[1].split("```", 1)[0]
    printed = [line for line in runs[2][0].splitlines() if not line.startswith("[Gloo]")]
    assert shown.splitlines() == printed  # Gloo, which connects the processes, logs to stdout

"""Test configuration shared by every suite.

- JAX sees four CPU devices (for sharding tests) unless `XLA_FLAGS` already sets
  `--xla_force_host_platform_device_count` (CI also runs the suite with one). Tests that use
  several devices are marked `multidevice`; they build their mesh from the devices there are, or
  skip saying how many they need.
- Strict dtype promotion and rank promotion errors, so a test cannot pass by accident
  through an implicit upcast or broadcast.
- Hypothesis profiles follow JAX's own: `ci` (the default; bounded examples, derandomized, no
  deadline, no example database) and `dev` (many more examples). Choose with the environment
  variable `TIETRANSFORM_HYPOTHESIS_PROFILE`.
- Tests run on one pytest-xdist worker per available core (`-n auto` in pyproject's addopts);
  `-n 0` runs them in one process.
"""

import os


# Four host devices, so sharding and shard_map are tested on CPU. Must precede the first jax import.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
# `dev`: 2500 examples per property (settable with TIETRANSFORM_DEV_EXAMPLES), so one dev run of
# the property suite (three full and two half-sized properties, and the lifecycle machine) tries
# well over 10^4 examples in total. Hours on two cores: the main property compiles ~20 programs
# per example.
hypothesis.settings.register_profile(
    "dev",
    max_examples=int(os.environ.get("TIETRANSFORM_DEV_EXAMPLES", "2500")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("TIETRANSFORM_HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core this process may run on.

    xdist's default asks psutil for the host's physical cores, which overcounts in a container
    pinned to fewer; every worker holds its own JAX runtime, so extra workers cost memory and gain
    nothing.
    """
    del config
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multidevice: uses a mesh of several devices (built from those there are)"
    )


@pytest.fixture
def getkey():
    """Returns a function that hands out fresh PRNG keys, deterministically per test."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)

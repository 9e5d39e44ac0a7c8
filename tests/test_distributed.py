"""Training a tied model on several devices: the Universal Transformer example's data-parallel
and FSDP steps give the one-device gradients, and the fused FFN runs per shard of the batch.

Each test builds a 4-device mesh from the visible devices and skips with fewer (CI's 1-device
pass). Shapes are tiny and chosen so that the global batch (8 sequences, 56 tokens) and the
per-device batch (2 sequences, 14 tokens) are sizes no parameter has: an HLO shape with those
sizes is activations, not weights.
"""

import importlib.util
import pathlib
import re
from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tietransform as tt
from tests.helpers import equations


_PATH = pathlib.Path(__file__).parents[1] / "examples" / "universal_transformer.py"
_spec = importlib.util.spec_from_file_location("universal_transformer", _PATH)
assert _spec is not None and _spec.loader is not None
ut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ut)

DEVICES, N, WIDTH, DIGITS, BATCH = 4, 2, 16, 6, 8  # seq = DIGITS + 1 = 7; 56 tokens

pytestmark = [
    pytest.mark.multidevice,
    pytest.mark.skipif(
        len(jax.devices()) < DEVICES,
        reason=f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)",
    ),
]


@pytest.fixture(scope="module")
def setup():
    model = ut.build(N, WIDTH, DIGITS, jax.random.key(0))  # op by op: no compile for tiny shapes
    tokens, targets = ut.addition_batch(jax.random.key(1), BATCH, DIGITS)
    packed = tt.pack(model, ut.SPEC)
    one_device = _grad_fn(ut.tied_loss)(packed, tokens, targets)
    return packed, tokens, targets, one_device


def _grad_fn(objective) -> Any:
    return eqx.filter_jit(eqx.filter_value_and_grad(lambda *a: objective(*a)[0]))


def _sharded(packed, tokens, targets, param_sharding):
    mesh = ut.data_mesh(DEVICES)
    batch = NamedSharding(mesh, P("data"))
    placed = ut.place(packed, mesh, param_sharding)
    return mesh, placed, jax.device_put(tokens, batch), jax.device_put(targets, batch)


def _assert_close_to_one_device(got, expected):
    # f32: the mean loss and each gradient are sums over the batch's 56 tokens. Split over 4
    # devices, each sums its 14 tokens and an all-reduce adds the 4 partial sums: the same terms
    # added in another order. Reordering n terms changes a float32 sum by at most about
    # n * eps * sum|terms| (eps = 2**-24 per rounding), so we allow 1e-5 of each leaf's largest
    # magnitude (n = 56: ~3e-6, plus the backward's own reductions over width and hidden).
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        e = np.asarray(e)
        if e.size == 0:  # a placeholder's layout record
            assert g.shape == e.shape
            continue
        np.testing.assert_allclose(np.asarray(g), e, rtol=0, atol=1e-5 * (np.abs(e).max() + 1e-6))


@pytest.mark.parametrize("param_sharding", ["replicated", "fsdp"])
def test_tied_gradients_on_four_devices_equal_the_one_device_gradients(setup, param_sharding):
    packed, tokens, targets, expected = setup
    grad = _grad_fn(ut.tied_loss)
    mesh, placed, x, y = _sharded(packed, tokens, targets, param_sharding)
    with jax.set_mesh(mesh):
        got = grad(placed, x, y)
    _assert_close_to_one_device(got, expected)
    spec = ut.param_spec(packed.blocks.mlp.w1.data.shape, DEVICES, param_sharding)
    assert got[1].blocks.mlp.w1.data.sharding.spec == spec  # the tied buffer's gradient
    #                                                         is sharded as the buffer is


def _pallas_call_input_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The shape of the first operand of every `pallas_call` in `jaxpr`, nested ones included."""
    return [
        tuple(eqn.invars[0].aval.shape)
        for eqn in equations(jaxpr)
        if eqn.primitive.name == "pallas_call"
    ]


def test_fused_ffn_in_a_sharded_step_runs_per_shard_and_gives_the_unrouted_gradients(setup):
    packed, tokens, targets, expected = setup
    routed = _grad_fn(tt.tie(ut.loss_fn, ut.SPEC, fuse_ffn=True))
    mesh, placed, x, y = _sharded(packed, tokens, targets, "fsdp")
    with jax.set_mesh(mesh):
        with tt.ffn_routing_report() as report:
            jaxpr = jax.make_jaxpr(routed)(placed, x, y)
        compiled = routed.lower(placed, x, y).compile()
        got, hlo = compiled(placed, x, y), compiled.compiled.as_text()
    assert [r.served_by for r in report] == ["kernels.ffn[interpret]"]
    # Forward and backward kernels all see one device's tokens: 2 sequences x 7 = 14 rows
    # (padded to whole 8-row blocks: 16), not the batch's 56.
    shapes = _pallas_call_input_shapes(jaxpr)
    assert shapes and all(14 <= s[0] <= 16 for s in shapes), shapes
    # No all-gather of batch-shaped activations (8 sequences or 56 tokens): only weights are
    # gathered (FSDP), whose sizes are 2, 7, 10, 16, 48, 64 and 100. (XLA does gather the int32
    # token ids for the embedding's lookup, s32[8,7,2], outside the FFN; floats only here.)
    gathers = re.findall(r"= f\d+\[([\d,]*)\][^ ]* all-gather\(", hlo)
    assert gathers, "FSDP gathers its weights: the pattern should find them"
    assert not [g for g in gathers if {8, 56} & {int(d) for d in g.split(",") if d}], gathers
    _assert_close_to_one_device(got, expected)

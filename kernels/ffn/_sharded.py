"""Running the fused FFN per shard of the tokens when a mesh is in context.

A `pallas_call` is opaque to XLA's SPMD partitioner: in a sharded program it would be run on the
whole batch, gathered onto every device. So when `kernels.ffn` is called under a mesh
(`jax.set_mesh(mesh)`, or `jax.sharding.use_mesh` on older JAX), the kernel runs inside a
`jax.shard_map` over the tokens' leading axis:

- mesh axes of type `Auto`: the leading axis of `x` is split over all of them (a data-parallel
  batch; XLA reshards `x` if it was sharded otherwise, never gathers it);
- `Explicit` axes: the leading axis is split over the axes its sharding names;
- `Manual` axes (already inside a `shard_map`): nothing to do, the call is already per shard.

Weights and biases enter replicated (`P()`): FSDP-sharded weights are gathered for the call, as
FSDP does for every layer, and their cotangents are summed over the shards (shard_map's
transpose). Without a mesh in context nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec as P


def token_axes(x: Any) -> tuple[str, ...]:
    """The mesh axes in context that `x`'s leading axis should be split over (maybe none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto]
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec and spec[0] is not None:
        lead = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        axes += [a for a in lead if a not in axes]
    return tuple(axes)


def shards(axes: tuple[str, ...]) -> int:
    """How many shards `axes` split an axis into, on the mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes)


def per_shard(
    local: Callable[..., jax.Array], axes: tuple[str, ...], x: jax.Array, *operands: Any
) -> jax.Array:
    """`local(x, *operands)` run on each shard of `x`'s leading axis over `axes`; the operands
    (weights, biases, `None`s) replicated. The result is split like `x`."""
    present = [i for i, a in enumerate(operands) if a is not None]

    def body(x_shard, *arrays):
        full = list(operands)
        for i, a in zip(present, arrays, strict=True):
            full[i] = a
        return local(x_shard, *full)

    # check_vma=False: pallas_call's outputs carry no varying-axes annotation; shard_map's
    # transpose then sums the replicated operands' cotangents over `axes` itself.
    mapped = jax.shard_map(
        body,
        in_specs=(P(axes), *(P() for _ in present)),
        out_specs=P(axes),
        check_vma=False,
    )
    return mapped(x, *(operands[i] for i in present))

"""Shared models and reference semantics for the tietransform suites."""

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from tietransform._compat import inner_jaxprs
from tietransform.testing import tolerance, tree_allclose


__all__ = [
    "Block",
    "Stack",
    "Tower",
    "assert_trees_close",
    "equations",
    "hlo_parameter_count",
    "rounding_depth",
    "tolerance",
]


class Block(eqx.Module):
    """One repetition: its own mixing layer, and an MLP that a spec may tie across blocks."""

    attn: eqx.nn.Linear
    mlp: eqx.nn.MLP

    def __init__(self, width: int, hidden: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.Linear(width, width, key=k1)
        self.mlp = eqx.nn.MLP(width, width, hidden, depth=1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + jnp.tanh(self.attn(x))
        return x + self.mlp(x)


class Tower(eqx.Module):
    """`n` blocks applied in sequence: a Universal Transformer's shape without attention."""

    blocks: list[Block]

    def __init__(self, n: int, width: int = 8, hidden: int = 16, *, key: jax.Array):
        self.blocks = [Block(width, hidden, key=k) for k in jax.random.split(key, n)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class Stack(eqx.Module):
    """Scan-over-layers: `weight[i]` is layer `i`'s `(d, d)` matrix."""

    weight: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(h @ w), None

        return jax.lax.scan(layer, x, self.weight)[0]


def tower_loss(model: Tower, x: jax.Array) -> jax.Array:
    return jnp.mean(jax.vmap(model)(x) ** 2)


def assert_trees_close(got, expected, summands: int = 1) -> None:
    problems = tree_allclose(got, expected, summands=summands)
    assert not problems, "\n".join(problems)


def hlo_parameter_count(compiled_text: str) -> int:
    """Number of parameters of the ENTRY computation of compiled HLO text."""
    entry = compiled_text[compiled_text.index("ENTRY") :]
    body = entry[: entry.index("\n}")]
    return len(
        {
            line.split("parameter(")[1].split(")")[0]
            for line in body.splitlines()
            if " parameter(" in line
        }
    )


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of `jaxpr` (open or closed), depth first, those of its inner jaxprs (scan
    and cond bodies, jit, checkpoint, custom derivative rules, kernels) included."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for inner in inner_jaxprs(eqn):
            yield from equations(inner)


def float_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]


def array_bytes(tree) -> int:
    """Bytes held by the array leaves of `tree`."""
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def rounding_depth(jaxpr: jex_core.Jaxpr | jex_core.ClosedJaxpr) -> int:
    """An upper bound on the number of roundings along any path through `jaxpr`.

    Two programs that compute the same real function (a tied program and its untied reference)
    are compiled by XLA with different fusions, FMA contractions and reduction orders, so every
    rounding on a path may differ between them. Counted: one per equation; a `dot_general` two per
    contracted term (a product and its sum), a reduction one per accumulated term; a `scan` body
    `length` times; a `cond` its deepest branch. A `while` body counts once (its trip count is
    not static), so a program with a data-dependent loop is not bounded by this count.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    depth = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "cond":
            depth += 1 + max(rounding_depth(b) for b in eqn.params["branches"])
            continue
        inner = [
            rounding_depth(v)
            for v in eqn.params.values()
            if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))
        ]
        if inner:
            depth += 1 + sum(inner) * (eqn.params["length"] if name == "scan" else 1)
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            depth += 2 * int(np.prod([shape[d] for d in contract], dtype=np.int64))
        elif name.startswith("reduce_") or name in ("argmax", "argmin", "cumsum"):
            size = int(np.prod(eqn.invars[0].aval.shape, dtype=np.int64))
            out = max(int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)), 1)
            depth += max(size // out, 1)
        else:
            depth += 1
    return depth

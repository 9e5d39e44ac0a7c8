"""The one problem every backend solves: a (gated) FFN written as a hidden function `phi`.

`h = phi(x @ W_1 + b_1, ..., x @ W_k + b_k)`, `out = h @ W_out + b_out`.

A plain FFN has one input projection and `phi = activation`; the gated (SwiGLU-style) FFN has two
and `phi(z_g, z_u) = activation(z_g) * z_u`. Writing both as one problem lets every kernel,
reference and backward share the code, with the hidden function's derivative taken by `jax.vjp`.

**Numerics (the contract every backend meets):** pre-activations and outputs are accumulated in
float32; biases are added and `phi` is evaluated in float32; the hidden activation is rounded to
the input dtype before the second matmul; the output is rounded to the input dtype at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


__all__ = ["Gated", "Hidden"]

Activation = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Hidden:
    """`phi(z) = activation(z)`: the hidden function of a plain FFN (one input projection)."""

    activation: Activation
    arity: int = dataclasses.field(default=1, init=False)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.activation(z)


@dataclasses.dataclass(frozen=True)
class Gated:
    """`phi(z_g, z_u) = activation(z_g) * z_u`: the hidden function of a gated FFN (SwiGLU)."""

    activation: Activation
    arity: int = dataclasses.field(default=2, init=False)

    def __call__(self, z_gate: jax.Array, z_up: jax.Array) -> jax.Array:
        return self.activation(z_gate) * z_up


HiddenFn = Hidden | Gated

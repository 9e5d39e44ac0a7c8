"""Block sizes and padding: how a `(tokens, hidden)` problem is cut into kernel blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


__all__ = ["Blocks", "pad_axis", "round_up"]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is `>= n`."""
    return -(-n // multiple) * multiple


def pad_axis(a: jax.Array | None, axis: int, size: int) -> jax.Array | None:
    """Zero-pad `a` along `axis` to `size` (a no-op, and no copy, when it already has it)."""
    if a is None or a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A tiling of `tokens x hidden`: token blocks of `block_m` rows, hidden chunks of `block_h`.

    `tokens`/`hidden` are the true sizes; `padded_*` the sizes the kernels see. The kernels mask
    the padding (see `kernels.ffn._math.valid_mask`) so it never changes a result.
    """

    tokens: int
    hidden: int
    block_m: int
    block_h: int

    @classmethod
    def choose(
        cls,
        tokens: int,
        hidden: int,
        *,
        block_m: int,
        block_h: int,
        m_align: int,
        h_align: int,
    ) -> Blocks:
        """Clamp the preferred blocks to the problem, keeping them multiples of the alignments.

        A hidden chunk (at least half the preferred one) that divides `hidden` is preferred over
        one that needs padding.
        """
        bm = min(round_up(block_m, m_align), round_up(tokens, m_align))
        bh = min(round_up(block_h, h_align), round_up(hidden, h_align))
        for candidate in range(bh, max(bh // 2, h_align) - 1, -h_align):
            if hidden % candidate == 0:
                bh = candidate
                break
        return cls(tokens, hidden, bm, bh)

    @property
    def padded_tokens(self) -> int:
        return round_up(self.tokens, self.block_m)

    @property
    def padded_hidden(self) -> int:
        return round_up(self.hidden, self.block_h)

    @property
    def grid_m(self) -> int:
        return self.padded_tokens // self.block_m

    @property
    def grid_h(self) -> int:
        return self.padded_hidden // self.block_h

    @property
    def mask_rows(self) -> int:
        """`tokens` if token padding must be masked, else 0."""
        return self.tokens if self.padded_tokens != self.tokens else 0

    @property
    def mask_cols(self) -> int:
        """`hidden` if hidden padding must be masked, else 0."""
        return self.hidden if self.padded_hidden != self.hidden else 0

"""Hypothesis strategies for the kernel suites: draw structure and seeds, never raw floats."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.kernels.helpers import ACTIVATIONS, Problem


@st.composite
def problems(draw, dtypes=("float32", "bfloat16", "float16")) -> Problem:
    """An FFN problem with ragged sizes (not multiples of any block) as often as aligned ones."""
    return Problem(
        tokens=draw(st.integers(1, 160)),
        d=draw(st.sampled_from([8, 16, 40])),
        hidden=draw(st.integers(1, 300)),
        dtype=draw(st.sampled_from(dtypes)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        gated=draw(st.booleans()),
        biases=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


block_ms = st.sampled_from([8, 16, 64])

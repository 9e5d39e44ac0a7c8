"""Hypothesis strategies for tied pytrees (requires `hypothesis`).

Strategies draw structure, shapes, dtypes and seeds, never raw floats: arrays come from
`jax.random.normal(jax.random.key(seed), shape)`.
"""

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from hypothesis import strategies as st
from jax import lax

from .._spec import TieSpec, group, stack, view


@dataclasses.dataclass
class TiedProblem:
    """A random model, a spec tying parts of it, and a function reading every leaf.

    **Attributes:**

    - `params`: a nested dict/list pytree of arrays (`blocks`, optional `emb`/`head`, `stack`).
    - `spec`: the drawn [`tietransform.TieSpec`][].
    - `fn`: `(params, x) -> scalar`, nonlinear in every leaf with a different constant per path,
      so members of a group get different gradients. It scans over `params["stack"]`.
    - `args`: `(x,)`, a scalar of the problem's dtype.
    - `description`: the declarations drawn, for failure messages.
    """

    params: Any
    spec: TieSpec
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    description: str


def _path_constant(path: str) -> float:
    return 0.5 + (zlib.crc32(path.encode()) % 1000) / 1000.0


def _read_all(params: Any, x: jax.Array) -> jax.Array:
    total = jnp.zeros((), x.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if name == "['stack']":
            continue
        total = total + jnp.sum(jnp.sin(leaf * _path_constant(name) + x))
    if "stack" in params:

        def step(carry: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
            # A mean, not a sum: the tanh's argument stays within +-1.9, so it never saturates
            # to exactly 1.0 in float32 (a zero gradient for every slice).
            carry = jnp.tanh(carry * 0.9 + jnp.mean(jnp.sin(layer + carry)))
            return carry, carry

        carry, _ = lax.scan(step, x, params["stack"])
        total = total + carry
    return total


_VIEW_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "transpose": jnp.transpose,
    "negate_reverse": lambda w: -w[::-1],
    "tanh": jnp.tanh,
}


@st.composite
def shapes(
    draw: st.DrawFn, min_dims: int = 0, max_dims: int = 3, max_side: int = 4
) -> tuple[int, ...]:
    """A small array shape."""
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims)))


@st.composite
def tied_problems(
    draw: st.DrawFn,
    dtypes: Sequence[Any] = (jnp.float32,),
    views: bool = True,
    stacks: bool = True,
) -> TiedProblem:
    """A [`TiedProblem`][tietransform.testing.strategies.TiedProblem]: random blocks tied by a
    random declaration (pattern, explicit paths or `where`; whole blocks or one leaf; any
    canonical member), optionally a view and a stacked tie, random shapes and dtypes."""
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**31 - 1))
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(next(keys), shape, dtype)

    num_blocks = draw(st.integers(2, 4))
    block_shapes: dict[str, Any] = {"w": draw(shapes(min_dims=1)), "b": draw(shapes())}
    if draw(st.booleans()):
        block_shapes["inner"] = {"v": draw(shapes(min_dims=1))}
    blocks = [
        jax.tree.map(normal, block_shapes, is_leaf=lambda s: isinstance(s, tuple))
        for _ in range(num_blocks)
    ]
    params: dict[str, Any] = {"blocks": blocks, "scale": normal(())}
    chosen = sorted(draw(st.sets(st.integers(0, num_blocks - 1), min_size=2, max_size=num_blocks)))
    leaf = draw(st.sampled_from(["", ".w", ".b"]))
    form = draw(st.sampled_from(["pattern", "paths", "where"]))
    if form == "pattern" and len(chosen) == num_blocks:
        members: Any = f"blocks[*]{leaf}"
    elif form == "where":
        key_name = leaf[1:]

        def where(p: Any) -> list[Any]:
            return [p["blocks"][i][key_name] if key_name else p["blocks"][i] for i in chosen]

        members = where
    else:
        members = [f"blocks[{i}]{leaf}" for i in chosen]
    canonical = draw(st.none() | st.integers(0, len(chosen) - 1))
    declarations: dict[str, Any] = {"ffn": group(members, canonical=canonical)}
    shown = members if isinstance(members, str | list) else f"where: blocks {chosen}{leaf}"
    description = [f"ffn=group({shown}, canonical={canonical})"]
    if views and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(_VIEW_FNS)))
        a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        params["emb"] = normal((a, b))
        params["head"] = normal((b, a) if name == "transpose" else (a, b))
        declarations["head"] = view("emb", "head", _VIEW_FNS[name])
        description.append(f"head=view(emb {a}x{b}, {name})")
    if stacks and draw(st.booleans()):
        length = draw(st.integers(3, 5))
        params["stack"] = normal((length, *draw(shapes(max_dims=2))))
        slices = sorted(draw(st.sets(st.integers(0, length - 1), min_size=2, max_size=length)))
        declarations["layers"] = stack("stack", slices)
        description.append(f"layers=stack(L={length}, slices={slices})")
    x = normal(())
    return TiedProblem(params, TieSpec(declarations), _read_all, (x,), "; ".join(description))

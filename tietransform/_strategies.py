"""Sharing strategies of recursive transformers: `L` layers read `k` shared blocks.

The strategies of ALBERT, Relaxed Recursive Transformers and Mixture-of-Recursions, each a map
from layer `i` to the block it reads (`None`: the layer keeps its own weights):

| strategy          | layer `i` reads                                                   |
| ----------------- | ----------------------------------------------------------------- |
| `cycle`           | block `i mod k`                                                   |
| `sequence`        | block `i // (L / k)`                                              |
| `middle_cycle`    | its own weights if first or last, else block `(i - 1) mod k`      |
| `middle_sequence` | its own weights if first or last, else block `(i - 1) // ((L - 2) / k)` |

`share_layers` turns a strategy into explicit declarations, one group per block, so a strategy
is exactly the groups it stands for: a list of blocks gets `tt.group`s of `path[i]`, a stacked
(scan-over-layers) model `tt.stack`s of slices, which `tie` reads inside `lax.scan` without an
`L`-fold copy.
"""

import dataclasses
from typing import Literal, get_args

from ._spec import Group, Relaxed, Stack, group, stack


Strategy = Literal["cycle", "sequence", "middle_cycle", "middle_sequence"]
BlockInit = Literal["lower", "upper", "average"]


def layer_blocks(strategy: Strategy, *, layers: int, blocks: int) -> tuple[int | None, ...]:
    """The block each of `layers` layers reads under `strategy` with `blocks` shared blocks.

    **Returns:** a tuple of length `layers`; entry `i` is the block layer `i` reads, or `None`
    for a layer that keeps its own weights (the first and last under the `middle_*` strategies).

    **Raises:** `ValueError` for an unknown strategy, or counts that do not divide as the
    strategy needs (`sequence` needs `layers` divisible by `blocks`).
    """
    if strategy not in get_args(Strategy):
        raise ValueError(
            f"Unknown sharing strategy {strategy!r}; choose one of {list(get_args(Strategy))}."
        )
    if isinstance(layers, bool) or isinstance(blocks, bool):
        raise TypeError("layers and blocks are counts (ints), not bools.")
    middle = strategy.startswith("middle_")
    shared = layers - 2 if middle else layers
    if blocks < 1 or shared < blocks:
        raise ValueError(
            f"Sharing strategy {strategy!r} maps {shared} "
            f"{'middle ' if middle else ''}layers onto {blocks} blocks: need 1 <= blocks <= "
            f"{shared} (layers={layers})."
        )
    if strategy.endswith("sequence") and shared % blocks:
        raise ValueError(
            f"Sharing strategy {strategy!r} needs the {shared} {'middle ' if middle else ''}"
            f"layers to divide into {blocks} equal runs; use a block count that divides "
            f"{shared}, or `cycle`."
        )
    if strategy.endswith("cycle"):
        inner = [i % blocks for i in range(shared)]
    else:
        inner = [i // (shared // blocks) for i in range(shared)]
    return (None, *inner, None) if middle else tuple(inner)


def share_layers(
    path: str,
    strategy: Strategy,
    *,
    layers: int,
    blocks: int,
    stacked: bool = False,
    init: BlockInit = "lower",
    name: str = "block",
    relax: Relaxed | None = None,
) -> dict[str, Group | Stack]:
    """Declarations that share `layers` layers among `blocks` blocks by `strategy`.

    **Arguments:**

    - `path`: where the layers are. For a list of blocks, a pattern with one `[*]` standing for
      the layer index (`"blocks[*]"`, `"blocks[*].mlp"`); for a stacked model (`stacked=True`),
      the stacked subtree, as for [`tietransform.stack`][] (`"blocks"`, `"blocks.mlp"`).
    - `strategy`: `"cycle"`, `"sequence"`, `"middle_cycle"` or `"middle_sequence"` (see
      [`tietransform.layer_blocks`][]).
    - `layers`, `blocks`: `L` and `k`.
    - `stacked`: whether the layers are slices of stacked arrays.
    - `init`: what a block's buffer starts from when an untied model is packed: the lowest
      layer that reads it (`"lower"`), the highest (`"upper"`), or the elementwise mean of the
      layers it replaces (`"average"`; the buffer lives at the lowest layer's place).
    - `name`: block `j`'s group is named `f"{name}_{j}"`.
    - `relax`: `tt.relaxed(rank)` gives every layer that reads a shared block its own low-rank
      delta on the block's matrices (Relaxed Recursive Transformers; see
      [`tietransform.relaxed`][]).

    **Returns:**

    The declarations record `layers`, so packing a model whose list or stack has another
    number of layers is refused rather than leaving the extra layers untied.

    A dict of group name to declaration, for [`tietransform.TieSpec`][]:
    `tt.TieSpec(tt.share_layers("blocks[*]", "cycle", layers=12, blocks=3))`, or merged with other
    groups (`tt.TieSpec({**shared, "head": ...})`). Blocks read by one layer only need no group.
    """
    if init not in get_args(BlockInit):
        raise ValueError(
            f"share_layers: init must be one of {list(get_args(BlockInit))}, got {init!r}: "
            "which layer a block keeps when an untied model is packed, or the layers' mean."
        )
    if not stacked and path.count("[*]") != 1:
        raise ValueError(
            f"share_layers over a list of blocks needs one `[*]` in the path for the layer "
            f"index, got {path!r} (e.g. 'blocks[*]' or 'blocks[*].mlp'). For stacked layers "
            "pass `stacked=True`."
        )
    of_layer = layer_blocks(strategy, layers=layers, blocks=blocks)
    declarations: dict[str, Group | Stack] = {}
    for block in range(blocks):
        members = [i for i, b in enumerate(of_layer) if b == block]
        if len(members) < 2:
            continue
        keep = members[-1] if init == "upper" else members[0]
        how = "average" if init == "average" else "canonical"
        if stacked:
            declared = stack(path, members, canonical=keep, init=how, relax=relax)
            declarations[f"{name}_{block}"] = dataclasses.replace(declared, layers=layers)
        else:
            paths = [path.replace("[*]", f"[{i}]") for i in members]
            canonical = path.replace("[*]", f"[{keep}]")
            declared = group(*paths, canonical=canonical, init=how, relax=relax)
            layer_nodes = path[: path.index("[*]") + 3]  # "blocks[*].mlp" -> "blocks[*]"
            declarations[f"{name}_{block}"] = dataclasses.replace(
                declared, layers=(layer_nodes, layers)
            )
    return declarations

"""Declaring tie groups: `TieSpec`, `group`, `view` and `stack`."""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, get_args

import numpy as np


Where: TypeAlias = Callable[[Any], Any]
"""An Equinox-style `where` function: given the model, returns a node or a list of nodes."""

Selector: TypeAlias = str | Where
"""A path pattern (`"blocks[*].mlp"`) or a `where` function."""


RelaxedInit: TypeAlias = Literal["svd", "zeros"]
Others: TypeAlias = Literal["shared", "own"]


@dataclasses.dataclass(frozen=True)
class Relaxed:
    """A relaxed tie: each member `l` reads `W + B_l @ A_l`. See [`tietransform.relaxed`][]."""

    rank: int
    init: RelaxedInit = "svd"
    others: Others = "shared"
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_index(self.rank) or self.rank < 1:
            raise ValueError(f"tt.relaxed: `rank` must be a positive int, got {self.rank!r}.")
        if self.init not in get_args(RelaxedInit):
            raise ValueError(
                f"tt.relaxed: `init` must be one of {list(get_args(RelaxedInit))}, got "
                f"{self.init!r}: 'svd' starts each delta at the truncated SVD of the member's "
                "residual (member - shared), 'zeros' at zero."
            )
        if self.others not in get_args(Others):
            raise ValueError(
                f"tt.relaxed: `others` must be one of {list(get_args(Others))}, got "
                f"{self.others!r}: what happens to leaves that are not matrices (biases, norms): "
                "tied strictly ('shared') or kept per member ('own')."
            )
        if not _is_index(self.seed):
            raise TypeError(f"tt.relaxed: `seed` must be an int, got {self.seed!r}.")

    def describe(self) -> str:
        """`rank 8, svd` (and `others own` when non-matrix leaves stay per member)."""
        own = ", others own" if self.others == "own" else ""
        return f"rank {self.rank}, {self.init}{own}"


def relaxed(
    rank: int, *, init: RelaxedInit = "svd", others: Others = "shared", seed: int = 0
) -> Relaxed:
    """Relax a tie: each member reads the shared weight plus its own trainable rank-`rank` delta.

    Pass it as `relax=` to [`tietransform.group`][], [`tietransform.stack`][] or
    [`tietransform.share_layers`][]. For every tied leaf that is a matrix (a member's leaf of
    shape `(m, n)`; a stacked leaf's slices), member `l` reads `W + B_l @ A_l`, with `W` the
    group's buffer, `B_l` of shape `(m, rank)` and `A_l` of shape `(rank, n)` (the Relaxed
    Recursive Transformers' layer-wise LoRA).

    **Arguments:**

    - `rank`: `r`, at most `min(m, n)` of every relaxed matrix.
    - `init`: how `tt.pack` fills the factors from an untied model. `"svd"`: the truncated SVD of
      the residual `W_l - W` (`B_l = U_r sqrt(S_r)`, `A_l = sqrt(S_r) V_r^T`), so at full rank the
      untied model comes back exactly. `"zeros"`: the delta starts at zero. Either way a
      direction with a zero singular value gets `B = 0` and a small random row of `A` (seeded by
      `seed`, as LoRA initializes), so that every factor receives a gradient.
    - `others`: the leaves that are not matrices (biases, norm scales): tied strictly
      (`"shared"`) or kept per member, untied (`"own"`).
    - `seed`: the seed of those random rows.

    **Returns:**

    A `Relaxed` option. Packed, the group's buffer is stored once and each member's factors with
    it (see [`tietransform.RelaxedLeaf`][]); gradients reach `W` summed over the members and each
    factor on its own. Where a relaxed read feeds a matmul, `tie` computes
    `x @ W + (x @ B_l) @ A_l` and never builds `W + B_l @ A_l`; any other use builds it for that
    use only. `tt.unpack` builds every member's `W + B_l @ A_l`: a dense, untied model.
    """
    return Relaxed(rank, init, others, seed)


@dataclasses.dataclass(frozen=True)
class Group:
    """A plain tie group: every member reads the canonical member's value.

    See [`tietransform.group`][]."""

    members: tuple[Selector, ...]
    canonical: str | int | None = None
    init: "Init" = "canonical"
    layers: tuple[str, int] | None = None
    """`(pattern, L)`: the pattern (`"blocks[*]"`) must match exactly `L` nodes, as a sharing
    strategy over `L` layers needs (`share_layers` sets it)."""
    relax: Relaxed | None = None

    def __post_init__(self) -> None:  # also when built directly, not through `tt.group`
        _check_init("tt.Group", self.init)
        _check_relax("tt.Group", self.relax)
        if not (self.canonical is None or isinstance(self.canonical, str)):
            if not _is_index(self.canonical):
                raise TypeError(
                    f"tt.Group: `canonical` must be a member's path or its int position, got "
                    f"{self.canonical!r}."
                )


@dataclasses.dataclass(frozen=True)
class View:
    """Members that are a function of one source. See [`tietransform.view`][]."""

    source: Selector
    targets: tuple[Selector, ...]
    fn: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Stack:
    """Slices of stacked arrays tied to one slice. See [`tietransform.stack`][]."""

    selector: Selector
    slices: tuple[int, ...] | None
    canonical: int | None = None
    init: "Init" = "canonical"
    layers: int | None = None
    """The length the stacked axis must have, as a sharing strategy over `L` layers needs
    (`share_layers` sets it)."""
    relax: Relaxed | None = None

    def __post_init__(self) -> None:  # also when built directly, not through `tt.stack`
        _check_init("tt.Stack", self.init)
        _check_relax("tt.Stack", self.relax)
        if self.canonical is not None and not _is_index(self.canonical):
            raise TypeError(
                f"tt.Stack: `canonical` must be an int slice index, got {self.canonical!r}."
            )


Declaration: TypeAlias = Group | View | Stack

Init: TypeAlias = Literal["canonical", "average"]
"""How `pack` fills a group's buffer from an untied model: with its canonical member's value, or
with the elementwise mean of its members' values (converting a pretrained untied model)."""


def _check_init(what: str, init: Any) -> None:
    if init not in get_args(Init):
        raise ValueError(
            f"{what}: `init` must be one of {list(get_args(Init))}, got {init!r}: 'canonical' "
            "keeps the canonical member's value, 'average' the mean of the members' values."
        )


def _check_relax(what: str, relax: Any) -> None:
    if relax is not None and not isinstance(relax, Relaxed):
        raise TypeError(
            f"{what}: `relax` must be `tt.relaxed(rank)` or None, got {type(relax).__name__} "
            f"({relax!r})."
        )


def _as_selectors(what: str, value: Any) -> tuple[Selector, ...]:
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not items:
        raise ValueError(f"{what} names no members; give a path pattern or a `where` function.")
    for item in items:
        if not (isinstance(item, str) or callable(item)):
            raise TypeError(
                f"{what}: expected a path pattern (str) or a `where` function, got "
                f"{type(item).__name__} ({item!r})."
            )
    return items


def group(
    *members: Selector | Sequence[Selector],
    canonical: str | int | np.integer | None = None,
    init: Init = "canonical",
    relax: Relaxed | None = None,
) -> Group:
    """Declare a tie group explicitly, optionally choosing its canonical member.

    **Arguments:**

    - `*members`: path patterns (`"blocks[*].mlp"`) and/or `where` functions
      (`lambda m: [b.mlp for b in m.blocks]`). Every node they select is a member; a member that is
      a subtree is tied leaf by leaf.
    - `canonical`: the member whose value the group keeps, as its path (`"blocks[2].mlp"`) or its
      position in path order. Defaults to the first member in path order.
    - `init`: what `pack` stores in the group's buffer: the canonical member's value
      (`"canonical"`) or the elementwise mean of the members' values (`"average"`, as when a
      pretrained untied model is converted into a recursive one; integer and bool leaves keep
      the canonical member's value). The buffer lives at the canonical member's place either
      way.
    - `relax`: `tt.relaxed(rank)` gives every member its own low-rank delta on the matrix
      leaves (see [`tietransform.relaxed`][]); `None` (default) ties strictly.

    **Returns:**

    A declaration to pass to [`tietransform.TieSpec`][].
    """
    flat: list[Selector] = []
    for member in members:
        flat.extend(_as_selectors("tt.group", member))
    if not flat:
        raise ValueError("tt.group() needs at least one path pattern or `where` function.")
    if canonical is not None and not (isinstance(canonical, str) or _is_index(canonical)):
        raise TypeError(
            f"tt.group: `canonical` must be a member's path or its int position, got "
            f"{canonical!r} ({type(canonical).__name__}). A bool is not a position: write "
            "`canonical=1` or `canonical='blocks[1].mlp'`."
        )
    _check_init("tt.group", init)
    position = canonical if isinstance(canonical, str | None) else int(canonical)
    return Group(tuple(flat), position, init, relax=relax)


def view(source: Selector, target: Selector | Sequence[Selector], fn: Callable[[Any], Any]) -> View:
    """Tie `target` to a function of `source`, e.g. a language-model head to the embedding.

    **Arguments:**

    - `source`: a path pattern or `where` function selecting exactly one node; it keeps its value.
      It may be a member of a plain group or another view's target (a chain, as in T5/BART:
      `TieSpec(emb=["encoder.embed", "decoder.embed"], head=tt.view("encoder.embed", "lm_head",
      jnp.transpose))`): the view then reads that group's buffer. Several views may read one
      source.
    - `target`: one or more selectors; each selected node reads `fn(source)` (leaf by leaf when the
      nodes are subtrees).
    - `fn`: a JAX-traceable function from a source leaf to a target leaf, e.g. `jnp.transpose`.

    **Returns:**

    A declaration to pass to [`tietransform.TieSpec`][]. Gradients reach `source` pulled back
    through `fn`; the gradient of a buffer is the sum over its plain members and the pullback of
    every view that reads it.

    !!! Example
        ```python
        spec = tt.TieSpec(head=tt.view("embed.weight", "head.weight", jnp.transpose))
        ```
    """
    if not callable(fn):
        raise TypeError(f"tt.view: `fn` must be callable, got {type(fn).__name__}.")
    (src,) = _as_selectors("tt.view source", source)[:1]
    if isinstance(source, list | tuple) and len(source) != 1:
        raise ValueError("tt.view: `source` must select exactly one node.")
    return View(src, _as_selectors("tt.view target", target), fn)


def stack(
    selector: Selector,
    slices: Sequence[int] | np.ndarray | None = None,
    *,
    canonical: int | np.integer | None = None,
    init: Init = "canonical",
    relax: Relaxed | None = None,
) -> Stack:
    """Tie slices of a stacked (scan-over-layers) array along its leading axis.

    **Arguments:**

    - `selector`: a path pattern or `where` function selecting stacked arrays (or subtrees of
      them); each selected array `a` of shape `(L, ...)` is tied on its own.
    - `slices`: the indices `i` along axis 0 whose `a[i]` share one buffer (negative indices count
      from the end). `None` (the default) ties all `L` slices: one layer's weights serve every
      iteration of the scan.
    - `canonical`: the slice whose value is kept; defaults to the first of `slices` in index order.
    - `init`: what `pack` stores for the tied slices: the canonical slice (`"canonical"`) or
      their elementwise mean (`"average"`).
    - `relax`: `tt.relaxed(rank)` gives every tied slice its own low-rank delta (see
      [`tietransform.relaxed`][]); inside `lax.scan` the shared slice is a loop constant and
      the factors are scanned.

    **Returns:**

    A declaration to pass to [`tietransform.TieSpec`][]. Inside `lax.scan` over the stack, `tie`
    reads the kept slices directly, so no `L`-fold copy is built, forward or backward.

    !!! Example
        ```python
        # blocks.mlp holds (L, ...) stacked weights, scanned over; share one MLP across all L.
        spec = tt.TieSpec(ffn=tt.stack("blocks.mlp"))
        ```
    """
    if canonical is not None and not _is_index(canonical):
        raise TypeError(f"tt.stack: `canonical` must be an int slice index, got {canonical!r}.")
    index = None if canonical is None else int(canonical)
    kept: tuple[int, ...] | None = None
    if slices is not None:
        given = tuple(np.asarray(slices).tolist()) if _is_int_array(slices) else tuple(slices)
        if not all(_is_index(s) for s in given):
            raise TypeError(f"tt.stack: `slices` must be ints, got {list(given)}.")
        kept = tuple(int(s) for s in given)
        if len(kept) < 2:
            raise ValueError(f"tt.stack needs at least two slices to tie, got {list(kept)}.")
        # With negative indices membership depends on the axis length: checked at pack time.
        all_non_negative = index is not None and index >= 0 and min(kept) >= 0
        if all_non_negative and index not in kept:
            raise ValueError(f"tt.stack: canonical slice {index} is not one of {list(kept)}.")
    _check_init("tt.stack", init)
    (sel,) = _as_selectors("tt.stack", selector)[:1]
    return Stack(sel, kept, index, init, relax=relax)


def _is_index(x: Any) -> bool:
    """An int or a NumPy integer; a bool is not an index."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_int_array(x: Any) -> bool:
    """A NumPy or JAX array of integers (e.g. `np.arange(2)`), not a list."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.integer) and np.ndim(x) == 1


def _as_declaration(name: str, value: Any) -> Declaration:
    if isinstance(value, Group | View | Stack):
        return value
    try:
        return Group(_as_selectors(f"Tie group {name!r}", value))
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} Declare groups as `TieSpec({name}='blocks[*].mlp')`, with a `where` "
            "function, or with tt.group / tt.view / tt.stack."
        ) from None


class TieSpec:
    """The tie groups of a model, by name.

    **Arguments:**

    - `groups`: an optional mapping from group name to declaration (for names that are not
      Python identifiers).
    - `**named_groups`: group name to declaration. A declaration is a path pattern, a `where`
      function, a list of either, or one of [`tietransform.group`][], [`tietransform.view`][],
      [`tietransform.stack`][].

    A path pattern such as `"blocks[*].mlp"` selects every node whose path matches (`*` is one
    segment, `**` any number of segments; `[-1]` and `[1:]` index and slice lists as Python does;
    a quoted key such as `"['my key']"` is literal, globs apply to bare names only). Every path the
    library prints reads back as a pattern. A node that is a subtree ties all its array leaves,
    member by member; its non-array leaves (an activation function, a dropout rate) are left
    alone. A group's canonical value is its first member in path order unless the
    declaration names another. `TieSpec()`, with no groups, ties nothing (e.g. the "no sharing"
    arm of an ablation over sharing strategies).

    !!! Example
        ```python
        spec = tt.TieSpec(
            ffn="blocks[*].mlp",
            head=tt.view("embed.weight", "head.weight", jnp.transpose),
        )
        ```
    """

    def __init__(self, groups: Mapping[str, Any] | None = None, /, **named_groups: Any):
        merged = dict(groups or {})
        for name in named_groups:
            if name in merged:
                raise ValueError(f"Tie group {name!r} is declared twice.")
        merged.update(named_groups)
        for name in merged:
            if not isinstance(name, str) or not name:
                raise TypeError(f"Tie group names must be non-empty strings, got {name!r}.")
        self.groups: dict[str, Declaration] = {
            name: _as_declaration(name, value) for name, value in merged.items()
        }
        self._plans: dict[Any, Any] = {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={decl!r}" for name, decl in self.groups.items())
        return f"TieSpec({inner})"

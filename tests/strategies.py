"""Hypothesis strategies that draw tied models the way users write them.

A drawn [`Problem`][] is a model (an Equinox module or nested dicts; blocks as modules or dicts),
a spec with several declarations at once (plain groups over whole blocks or single leaves, by
pattern, explicit paths or `where`, any canonical member by path or position; views through random
functions with one or two targets, from the embedding or from any block weight, a plain group's
member or canonical included (a chain: the view reads the group's buffer);
several stacks with random slices, negative or not), a reading function that reads members more
than once, through matmuls, inside `vmap`, `lax.cond`, `lax.scan` and
`jax.checkpoint`, and a random composition of `jit`/`grad`/`vmap` to apply around it.

The strategies draw structure and seeds only; arrays come from
`jax.random.normal(jax.random.key(seed), shape)`. Every array has side `d` in {2, 3} (stacks add a
layer axis of 3 or 4), so eager primitives see a handful of shapes and JAX's caches serve them;
control flow and `jit` still compile once per drawn function, which is most of an example's cost.

Independently of tietransform, each problem knows its own tying, leaf by leaf (`Problem.ties`,
`Problem.stacks`): `materialise` builds the model every member of which holds its canonical value
(through its view), and `expected_grads` sums the untied gradients of a buffer's members (pulled
back through each view with `jax.vjp`; over tied slices for stacks) in float64 NumPy.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import lax

import tietransform as tt


Path = tuple[str | int, ...]


class Block(eqx.Module):
    """One layer `h -> tanh(w @ h + b)`: `w` is `(d, d)`, `b` is `(d,)`."""

    w: jax.Array
    b: jax.Array


class Net(eqx.Module):
    """The module form of a drawn model; the dict form has the same keys."""

    towers: list[list[Any]]
    emb: jax.Array
    heads: list[jax.Array]
    stacks: list[jax.Array]


def get(tree: Any, path: Path) -> Any:
    """The node at `path` (dict keys, list indices and attribute names alike)."""
    for key in path:
        tree = tree[key] if isinstance(tree, dict | list | tuple) else getattr(tree, key)
    return tree


def text(path: Path) -> str:
    """`path` as tietransform prints it: `towers[0][1].w`."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (("." if out else "") + key)
    return out


def with_leaves(tree: Any, values: dict[Path, Any]) -> Any:
    """`tree` with the leaves at the given paths replaced (dicts and modules alike)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for keypath, leaf in leaves:
        path = tuple(path_key(k) for k in keypath)
        out.append(values.get(path, leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def path_key(key: Any) -> str | int:
    """The attribute name, dict key or sequence index of one jax path key."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    return key.name


# ---------------------------------------------------------------------------------------------
# View functions: a small set of what users tie through. Each maps a (d, d) source to a target.

VIEW_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "transpose": jnp.transpose,
    "affine": lambda w: 0.5 * w + 0.25,
    "tanh": jnp.tanh,
    "reshape": lambda w: jnp.reshape(w, (-1,)),
    "flip": lambda w: -w[::-1],
}


@dataclasses.dataclass(frozen=True)
class Tie:
    """Leaf `member` reads `fn(source)` (`source` itself when `fn` is None)."""

    member: Path
    source: Path
    fn: Callable[[jax.Array], jax.Array] | None = None


def materialise(params: Any, ties: tuple[Tie, ...], stacks: dict[Path, tuple[int, ...]]) -> Any:
    """`params` with every member replaced by its canonical value (through its view), and slice
    `i` of each stacked leaf by slice `rows[i]`. `ties` lists sources before their readers."""
    values: dict[Path, Any] = {}
    read = lambda p: values.get(p, get(params, p))  # noqa: E731
    for tie in ties:
        source = read(tie.source)
        values[tie.member] = source if tie.fn is None else tie.fn(source)
    for path, rows in stacks.items():
        values[path] = get(params, path)[np.asarray(rows)]
    return with_leaves(params, values)


def kept(rows: tuple[int, ...]) -> tuple[int, ...]:
    """The distinct slices of a stacked leaf, in index order (the rows `pack` keeps)."""
    return tuple(sorted(set(rows)))


def expected_grads(
    full_grads: Any, at: Any, ties: tuple[Tie, ...], stacks: dict[Path, tuple[int, ...]]
) -> dict[Path, tuple[np.ndarray, float, int]]:
    """Per packed buffer: (expected gradient in float64, scale, number of summed members).

    A buffer's gradient is the sum of its members' untied gradients `full_grads` (pulled back
    through views with `jax.vjp` at the materialised model `at`); a stacked leaf's kept slice sums
    the slices tied to it. `scale` is the sum of the summands' magnitudes (for normwise errors).
    """
    grads: dict[Path, list[np.ndarray]] = {}
    for keypath, g in jax.tree_util.tree_flatten_with_path(full_grads)[0]:
        grads[tuple(path_key(k) for k in keypath)] = [np.asarray(g, np.float64)]
    for tie in reversed(ties):  # readers before their sources.
        for g in grads.pop(tie.member):
            if tie.fn is not None:
                source = get(at, tie.source)
                g = jax.vjp(tie.fn, source)[1](jnp.asarray(g, source.dtype))[0]
            grads[tie.source].append(np.asarray(g, np.float64))
    out = {}
    for path, parts in grads.items():
        if path in stacks:
            rows = np.asarray(stacks[path])
            (g,) = parts
            summed = np.stack([g[rows == k].sum(0) for k in kept(stacks[path])])
            scale = max(
                float(np.abs(g[rows == k]).max(initial=0.0)) * int((rows == k).sum())
                for k in kept(stacks[path])
            )
            out[path] = (summed, scale, int(np.bincount(rows).max()))
        else:
            scale = sum(float(np.abs(p).max(initial=0.0)) for p in parts)
            out[path] = (np.sum(parts, axis=0), scale, len(parts))
    return out


@dataclasses.dataclass
class Problem:
    """A drawn model, spec, reading function and transformation stack.

    **Attributes:**

    - `params`: the full model (dicts or `Net`/`Block` modules).
    - `spec`: the drawn `tt.TieSpec`.
    - `fn`: `(params, x) -> scalar`, x of shape `(d,)`, reading every leaf.
    - `x`: the input, `(d,)` float32.
    - `transforms`: names from `TRANSFORMS`, innermost first.
    - `ties`: leaf-level ties, sources before their readers.
    - `stacks`: stacked leaf path -> `rows`: slice `i` of the full array is slice `rows[i]`.
    - `description`: what was drawn, for failure messages.
    """

    params: Any
    spec: tt.TieSpec
    fn: Callable[..., jax.Array]
    x: jax.Array
    transforms: tuple[str, ...]
    ties: tuple[Tie, ...]
    stacks: dict[Path, tuple[int, ...]]
    description: str

    def materialise(self, params: Any) -> Any:
        return materialise(params, self.ties, self.stacks)

    def expected_grads(
        self, full_grads: Any, params: Any = None
    ) -> dict[Path, tuple[np.ndarray, float, int]]:
        """See `expected_grads`; views are pulled back at `params` (default: the drawn ones; pass
        them converted to the dtype the gradients were computed in)."""
        at = self.materialise(self.params if params is None else params)
        return expected_grads(full_grads, at, self.ties, self.stacks)

    def __repr__(self) -> str:
        return f"Problem({self.description})"


# ---------------------------------------------------------------------------------------------
# Reading functions.

WRAPPERS = ("plain", "twice", "vmap", "cond", "scan", "checkpoint")


def _layer(block: Any, h: jax.Array) -> jax.Array:
    w, b = (block["w"], block["b"]) if isinstance(block, dict) else (block.w, block.b)
    return jnp.tanh(w @ h + b)


def _tower(blocks: list[Any], h: jax.Array) -> jax.Array:
    for block in blocks:
        h = _layer(block, h)
    return h


def _wrapped(wrapper: str, f: Callable[[jax.Array], jax.Array]) -> Callable:
    """`f: (d,) -> (d,)` read inside one of the higher-order primitives users write."""
    if wrapper == "plain":
        return f
    if wrapper == "twice":
        return lambda h: f(f(h))
    if wrapper == "vmap":
        return lambda h: jnp.mean(jax.vmap(f)(jnp.stack([h, -0.5 * h])), axis=0)
    if wrapper == "cond":
        return lambda h: lax.cond(h[0] > 0, f, lambda v: 0.5 * f(v[::-1]), h)
    if wrapper == "scan":
        return lambda h: lax.scan(lambda c, _: (f(c), None), h, length=2)[0]
    if wrapper == "checkpoint":
        return jax.checkpoint(f)
    raise AssertionError(wrapper)


def make_fn(
    tower_wrappers: tuple[str, ...], stack_wrappers: tuple[str, ...], d: int
) -> Callable[[Any, jax.Array], jax.Array]:
    """`fn(params, x)`: x passes through every tower (each inside its wrapper), the embedding and
    each head as matmuls, and a scan over each stack; returns `1 + sum(h**2) / d`."""

    def fn(params: Any, x: jax.Array) -> jax.Array:
        p = (lambda k: params[k]) if isinstance(params, dict) else (lambda k: getattr(params, k))
        h = jnp.tanh(p("emb") @ x)
        for blocks, wrapper in zip(p("towers"), tower_wrappers, strict=True):
            h = _wrapped(wrapper, lambda v, blocks=blocks: _tower(blocks, v))(h)
        for head in p("heads"):
            h = jnp.tanh(jnp.reshape(head, (d, d)) @ h) + h * jnp.sum(jnp.sin(head))
        for stacked, wrapper in zip(p("stacks"), stack_wrappers, strict=True):
            body = lambda c, w: (jnp.tanh(w @ c), None)  # noqa: E731
            if wrapper == "checkpoint":
                body = jax.checkpoint(body)
            h = lax.scan(body, h, stacked)[0]
        return 1.0 + jnp.sum(h * h) / d

    return fn


# ---------------------------------------------------------------------------------------------
# Transformation stacks. Each maps `F(params, x) -> scalar` to another such function; the test
# takes `value_and_grad` with respect to params around the result.

TRANSFORMS = ("jit", "vmap", "grad_x", "checkpoint")


def transformed(f: Callable, names: tuple[str, ...]) -> Callable:
    for name in names:
        if name == "jit":
            f = jax.jit(f)
        elif name == "vmap":
            f = (lambda g: lambda p, x: jnp.mean(jax.vmap(g, (None, 0))(p, jnp.stack([x, -x]))))(f)
        elif name == "grad_x":
            f = (lambda g: lambda p, x: g(p, x) + jnp.sum(jax.grad(g, argnums=1)(p, x) ** 2))(f)
        elif name == "checkpoint":
            f = jax.checkpoint(f)
        else:
            raise AssertionError(name)
    return f


# ---------------------------------------------------------------------------------------------
# The strategy.


@st.composite
def problems(
    draw: st.DrawFn, *, transforms: bool = True, wrappers: tuple[str, ...] = WRAPPERS
) -> Problem:
    """A [`Problem`][]: see the module docstring for what is drawn. `transforms=False` draws no
    transformation stack; `wrappers` limits how towers are read (e.g. no `cond`, whose branch
    switch is a jump that finite differences cannot step across)."""
    seed = draw(st.integers(0, 2**31 - 1))
    d = draw(st.sampled_from([2, 3]))
    as_module = draw(st.booleans())
    blocks_as_modules = draw(st.booleans())
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(next(keys), shape, jnp.float32)

    def block() -> Any:
        w, b = normal((d, d)), normal((d,))
        return Block(w, b) if blocks_as_modules else {"w": w, "b": b}

    tower_sizes = draw(st.lists(st.integers(2, 3), min_size=1, max_size=2))
    towers = [[block() for _ in range(n)] for n in tower_sizes]
    stack_lengths = draw(st.lists(st.integers(3, 4), max_size=2))
    stacks = [normal((n, d, d)) for n in stack_lengths]

    declarations: dict[str, Any] = {}
    description: list[str] = []
    ties: list[Tie] = []

    for t, n in enumerate(tower_sizes):
        if not draw(st.booleans()):
            continue
        chosen = sorted(draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=n)))
        leaf = draw(st.sampled_from([(), ("w",), ("b",)]))
        form = draw(st.sampled_from(["pattern", "paths", "where"]))
        canonical = draw(st.none() | st.integers(0, len(chosen) - 1))
        paths = [("towers", t, i, *leaf) for i in chosen]
        if form == "pattern" and len(chosen) == n:
            members: Any = text(("towers", t)) + "[*]" + "".join(f".{k}" for k in leaf)
        elif form == "where":
            members = lambda m, paths=paths: [get(m, q) for q in paths]  # noqa: E731
        else:
            members = [text(q) for q in paths]
        if draw(st.booleans()) and canonical is not None and form != "where":
            canonical_arg: Any = text(paths[canonical])
        else:
            canonical_arg = canonical
        name = f"tower{t}"
        declarations[name] = tt.group(members, canonical=canonical_arg)
        shown = members if isinstance(members, str | list) else f"where{[text(q) for q in paths]}"
        description.append(f"{name}=group({shown}, canonical={canonical_arg!r})")
        source = paths[canonical or 0]
        for q in paths:
            if q == source:
                continue
            for sub in [()] if leaf else [("w",), ("b",)]:
                ties.append(Tie((*q, *sub), (*source, *sub)))

    heads = []
    weights = [("towers", t, i, "w") for t, n in enumerate(tower_sizes) for i in range(n)]
    sources: list[Path] = [("emb",), *weights]
    for v in range(draw(st.integers(0, 2))):
        fn_name = draw(st.sampled_from(sorted(VIEW_FNS)))
        # The embedding, or a block's weight (read by its block too); a weight that a plain
        # group ties makes a chain, whose view reads the group's buffer.
        source_path = sources.pop(draw(st.integers(0, len(sources) - 1)) if v else 0)
        shape = jax.eval_shape(VIEW_FNS[fn_name], jax.ShapeDtypeStruct((d, d), jnp.float32)).shape
        targets = [("heads", len(heads) + j) for j in range(draw(st.integers(1, 2)))]
        heads.extend(normal(shape) for _ in targets)
        declarations[f"view{v}"] = tt.view(
            text(source_path), [text(t) for t in targets], VIEW_FNS[fn_name]
        )
        description.append(
            f"view{v}=view({text(source_path)}, {[text(t) for t in targets]}, {fn_name})"
        )
        ties.extend(Tie(t, source_path, VIEW_FNS[fn_name]) for t in targets)
        if not sources:
            break

    stack_rows: dict[Path, tuple[int, ...]] = {}
    for s, n in enumerate(stack_lengths):
        if not draw(st.booleans()):
            continue
        slices = sorted(draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=n)))
        canonical = draw(st.none() | st.sampled_from(slices))
        negative = draw(st.booleans())
        written = [i - n for i in slices] if negative else slices
        declarations[f"stack{s}"] = tt.stack(text(("stacks", s)), written, canonical=canonical)
        description.append(f"stack{s}=stack(L={n}, slices={written}, canonical={canonical})")
        kept = slices[0] if canonical is None else canonical
        stack_rows[("stacks", s)] = tuple(kept if i in slices else i for i in range(n))

    if not declarations:  # at least one tie: fall back to tying the first tower's weights.
        paths = [("towers", 0, i, "w") for i in range(tower_sizes[0])]
        declarations["tower0"] = tt.group(text(("towers", 0)) + "[*].w")
        description.append(f"tower0=group({text(('towers', 0))}[*].w)")
        ties.extend(Tie(q, paths[0]) for q in paths[1:])

    parts = {"towers": towers, "emb": normal((d, d)), "heads": heads, "stacks": stacks}
    params = Net(**parts) if as_module else parts
    tower_wrappers = tuple(draw(st.sampled_from(wrappers)) for _ in towers)
    stack_wrappers = tuple(draw(st.sampled_from(["plain", "checkpoint"])) for _ in stacks)
    names: tuple[str, ...] = ()
    if transforms:  # at most one `grad_x`: second derivatives of second derivatives cost more.
        names = tuple(draw(st.lists(st.sampled_from(TRANSFORMS), max_size=2)))
        if names.count("grad_x") > 1:
            names = ("grad_x", "jit")
    description.append(
        f"d={d}, {'Net' if as_module else 'dict'} of {'Block' if blocks_as_modules else 'dict'}"
        f" blocks, towers={tower_sizes} read {tower_wrappers}, stacks={stack_lengths} read "
        f"{stack_wrappers}, transforms={names}"
    )
    return Problem(
        params=params,
        spec=tt.TieSpec(declarations),
        fn=make_fn(tower_wrappers, stack_wrappers, d),
        x=normal((d,)),
        transforms=names,
        ties=tuple(ties),
        stacks=stack_rows,
        description="; ".join(description),
    )


# ---------------------------------------------------------------------------------------------
# Relaxed ties (`tt.relaxed`): recursive models whose layers read `W + B_l @ A_l`.


class RelaxedLayer(eqx.Module):
    """One layer `h -> h + tanh(h @ w + b) @ out`: `w` is `(m, n)`, `b` `(n,)`, `out` `(n, m)`
    (each with a leading layer axis `L` when stacked)."""

    w: jax.Array
    b: jax.Array
    out: jax.Array


class RelaxedNet(eqx.Module):
    """The module form of a drawn relaxed model; the dict form is `{"blocks": ...}`."""

    blocks: Any  # a list of L layers, or one stacked layer


RELAXED_MATRICES = ("w", "out")  # the layer's matrix leaves: relaxed when tied; `b` follows others


@dataclasses.dataclass(frozen=True)
class RelaxedGroup:
    """Layers `members` share one block; `canonical` is where its buffer lives (the layer it is
    taken from, or where the mean is stored under `average`)."""

    members: tuple[int, ...]
    canonical: int
    average: bool


def strategy_blocks(strategy: str, layers: int, blocks: int) -> list[list[int]]:
    """Each block's layers under a sharing strategy, from the papers' definitions (ALBERT, Relaxed
    Recursive Transformers), written independently of `tt.layer_blocks`."""
    if strategy.startswith("middle_"):
        inner = strategy_blocks(strategy.removeprefix("middle_"), layers - 2, blocks)
        return [[i + 1 for i in members] for members in inner]
    if strategy == "cycle":
        return [[i for i in range(layers) if i % blocks == j] for j in range(blocks)]
    run = layers // blocks  # sequence
    return [list(range(j * run, (j + 1) * run)) for j in range(blocks)]


@dataclasses.dataclass
class RelaxedProblem:
    """A drawn recursive model, its relaxed spec and a loss.

    **Attributes:**

    - `params`: `{"blocks": ...}` or a `RelaxedNet`; `blocks` is a list of `RelaxedLayer`s or
      dicts, or one stacked layer (leaves with a leading axis `layers`).
    - `spec`: the drawn `tt.TieSpec` (a `share_layers` strategy or explicit groups/stacks).
    - `fn`: `(params, x) -> scalar`, x of shape `(BATCH, m)`.
    - `x`: the input.
    - `stacked`, `layers`, `m`, `n`, `rank`, `init`, `others`: what was drawn.
    - `relax`: the drawn `tt.relaxed(...)` option.
    - `where`: the path the declarations name (`"blocks[*]"`, `"blocks.w"`, ...).
    - `tied`: the layer's leaves the groups tie (`("w", "b", "out")` or `("w",)`).
    - `groups`: the tie groups, each member a layer index.
    - `strategy`: `(strategy, blocks, block_init)` when declared with `share_layers`, else None.
    - `reader`: `"right"` (`h @ w`) or `"left"` (`(w.T @ h.T).T`, the relaxed read transposed).
    - `penalty`: whether `fn` also reads `w` outside a matmul (a weight decay term).
    - `description`: what was drawn, for failure messages.
    """

    params: Any
    spec: tt.TieSpec
    fn: Callable[..., jax.Array]
    x: jax.Array
    stacked: bool
    layers: int
    m: int
    n: int
    rank: int
    init: str
    others: str
    relax: tt.Relaxed
    where: str
    tied: tuple[str, ...]
    groups: tuple[RelaxedGroup, ...]
    strategy: tuple[str, int, str] | None
    reader: str
    penalty: bool
    description: str

    @property
    def relaxed_leaves(self) -> tuple[str, ...]:
        """The tied matrix leaves: each member reads them as `W + B @ A`."""
        return tuple(k for k in RELAXED_MATRICES if k in self.tied)

    def group_of(self, layer: int) -> RelaxedGroup | None:
        return next((g for g in self.groups if layer in g.members), None)

    def relaxed_reads(self) -> int:
        """`m + n + r` summed over every relaxed member read: the terms by which the tied
        program's sums are reassociated (`x @ W + (x @ B) @ A` against `x @ (W + B @ A)`)."""
        members = sum(len(g.members) for g in self.groups)
        return members * len(self.relaxed_leaves) * (self.m + self.n + self.rank)

    def __repr__(self) -> str:
        return f"RelaxedProblem({self.description})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a falsifying example with this (not every field's arrays)."""
        del cycle
        printer.text(repr(self))


RELAXED_BATCH = 5  # differs from every matrix side (2..4): shapes cannot coincide in jaxpr checks


def _relaxed_layer_fn(reader: str, penalty: bool) -> Callable[[jax.Array, Any], jax.Array]:
    """One layer reading `w` as `h @ w` (`reader="right"`) or as `(w.T @ h.T).T` (`"left"`: the
    relaxed read transposed, on the matmul's left), and `out` as `h @ out`."""

    def layer(h: jax.Array, p: Any) -> jax.Array:
        w, b, out = (p["w"], p["b"], p["out"]) if isinstance(p, dict) else (p.w, p.b, p.out)
        z = h @ w if reader == "right" else (w.T @ h.T).T
        h = h + jnp.tanh(z + b[None]) @ out
        if penalty:  # `w` read outside a matmul: built as W + B A for this use only
            h = h + 0.01 * jnp.sum(w * w)
        return h

    return layer


def make_relaxed_fn(stacked: bool, reader: str, penalty: bool) -> Callable:
    """`fn(params, x)`: `x` through every layer (a Python loop over a list, `lax.scan` over a
    stack); returns `mean(h**2)`."""
    layer = _relaxed_layer_fn(reader, penalty)

    def fn(params: Any, x: jax.Array) -> jax.Array:
        blocks = params["blocks"] if isinstance(params, dict) else params.blocks
        if stacked:
            x = lax.scan(lambda h, p: (layer(h, p), None), x, blocks)[0]
        else:
            for p in blocks:
                x = layer(x, p)
        return jnp.mean(x * x)

    return fn


@st.composite
def relaxed_problems(
    draw: st.DrawFn,
    *,
    stacked: bool | None = None,
    full_rank: bool = False,
    lazy_only: bool = False,
    dtypes: tuple[Any, ...] = (jnp.float32,),
    forms: tuple[str, ...] = ("strategy", "explicit"),
    small: bool = False,
) -> RelaxedProblem:
    """A [`RelaxedProblem`][]: a list of layers or a stacked layer, tied by a `share_layers`
    strategy (cycle, sequence, middle_cycle, middle_sequence; lower, upper or average blocks) or
    by explicit disjoint `tt.group`s / `tt.stack`s (any canonical member, canonical or average
    init), over whole layers or their `w` only, relaxed at a random rank with `init` svd or
    zeros and `others` shared or own.

    - `stacked`: force lists (False) or stacks (True); drawn when None.
    - `full_rank`: rank `min(m, n)` with `init="svd"` (the conversion that reproduces the model).
    - `lazy_only`: every relaxed read is a matmul (no penalty term), `m != n` and
      `rank < min(m, n)`, so no factor or gradient has the shape of a member or of a stack of
      them (for jaxpr checks).
    - `dtypes`: the parameter dtypes to draw from.
    - `forms`: how the ties are declared, `"strategy"` (`share_layers`) and/or `"explicit"`.
    - `small`: two relaxed members of side 2 or 3 (rank 1 unless `full_rank`), their `w` only:
      few enough reassociated terms that bfloat16's first-order bound stays well below 1.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    stacked = draw(st.booleans()) if stacked is None else stacked
    as_module = draw(st.booleans())
    sides = [2, 3] if small else [2, 3, 4]
    if lazy_only:
        m, n = draw(st.sampled_from([(m, n) for m in sides for n in sides if m != n]))
    else:
        m, n = draw(st.sampled_from(sides)), draw(st.sampled_from(sides))
    init: Any = "svd"
    if full_rank:
        rank = min(m, n)
    else:
        rank = 1 if small else draw(st.integers(1, min(m, n) - (1 if lazy_only else 0)))
        init = draw(st.sampled_from(["svd", "zeros"]))
    others: Any = draw(st.sampled_from(["shared", "own"]))
    relax = tt.relaxed(rank, init=init, others=others, seed=draw(st.integers(0, 3)))
    dtype = draw(st.sampled_from(dtypes))
    tied = ("w",) if small else draw(st.sampled_from([("w", "b", "out"), ("w",)]))
    where = "blocks" if stacked else "blocks[*]"
    where += "" if len(tied) > 1 else ".w"

    form = draw(st.sampled_from(forms))
    strategy_drawn: tuple[str, int, str] | None = None
    if form == "strategy":
        strategy: Any = draw(
            st.sampled_from(["cycle", "sequence", "middle_cycle", "middle_sequence"])
        )
        shared = 2 if small else draw(st.integers(2, 5))
        if strategy.endswith("cycle"):  # block 0 gets two layers at least
            blocks = draw(st.integers(1, shared - 1))
        else:  # equal runs of two layers at least
            blocks = draw(st.sampled_from([k for k in range(1, shared) if shared % k == 0]))
        layers = shared + 2 if strategy.startswith("middle_") else shared
        block_init: Any = draw(st.sampled_from(["lower", "upper", "average"]))
        groups = tuple(
            RelaxedGroup(
                tuple(ms),
                ms[-1] if block_init == "upper" else ms[0],
                block_init == "average",
            )
            for ms in strategy_blocks(strategy, layers, blocks)
            if len(ms) > 1
        )
        declarations = tt.share_layers(
            where,
            strategy,
            layers=layers,
            blocks=blocks,
            stacked=stacked,
            init=block_init,
            relax=relax,
        )
        strategy_drawn = (strategy, blocks, block_init)
        shown = f"share_layers({where!r}, {strategy!r}, layers={layers}, blocks={blocks}, "
        shown += f"init={block_init!r})"
    else:
        layers = draw(st.integers(2, 3 if small else 5))
        order = draw(st.permutations(range(layers)))
        sizes: list[int] = [2] if small else []
        while sum(sizes) + 2 <= layers and (not sizes or draw(st.booleans())) and not small:
            sizes.append(draw(st.integers(2, layers - sum(sizes))))
        groups_list, start = [], 0
        for size in sizes:
            members = tuple(sorted(order[start : start + size]))
            start += size
            canonical = draw(st.sampled_from(members))
            groups_list.append(RelaxedGroup(members, canonical, draw(st.booleans())))
        groups = tuple(groups_list)
        declarations = {}
        for j, g in enumerate(groups):
            how = "average" if g.average else "canonical"
            if stacked:
                declarations[f"g{j}"] = tt.stack(
                    where, list(g.members), canonical=g.canonical, init=how, relax=relax
                )
            else:
                paths = [where.replace("[*]", f"[{i}]") for i in g.members]
                canonical_arg: Any = (
                    where.replace("[*]", f"[{g.canonical}]")
                    if draw(st.booleans())
                    else g.members.index(g.canonical)
                )
                declarations[f"g{j}"] = tt.group(
                    *paths, canonical=canonical_arg, init=how, relax=relax
                )
        shown = ", ".join(
            f"g{j}={list(g.members)} canonical {g.canonical}{' average' if g.average else ''}"
            for j, g in enumerate(groups)
        )
        shown = f"explicit {'stacks' if stacked else 'groups'} over {where!r}: {shown}"

    keys = jax.random.split(jax.random.key(seed), 4)

    def normal(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    # Scaled so that tanh stays off saturation and the layers neither explode nor vanish.
    leaves = {
        "w": normal(keys[0], (layers, m, n), 1 / np.sqrt(m)),
        "b": normal(keys[1], (layers, n), 0.5),
        "out": normal(keys[2], (layers, n, m), 0.5 / np.sqrt(n)),
    }
    if stacked:
        blocks_tree: Any = dict(leaves)
    else:
        blocks_tree = [{k: v[i] for k, v in leaves.items()} for i in range(layers)]
    layer_as_module = draw(st.booleans())
    if layer_as_module:
        blocks_tree = (
            RelaxedLayer(**blocks_tree)
            if stacked
            else [RelaxedLayer(**layer) for layer in blocks_tree]
        )
    params = RelaxedNet(blocks_tree) if as_module else {"blocks": blocks_tree}
    reader = draw(st.sampled_from(["right", "left"]))
    penalty = False if lazy_only else draw(st.booleans())
    x = normal(keys[3], (RELAXED_BATCH, m), 1.0)
    description = (
        f"{shown}; relaxed(rank={rank}, init={init!r}, others={others!r}); L={layers}, "
        f"m={m}, n={n}, {jnp.dtype(dtype).name}, {'stacked' if stacked else 'list'} of "
        f"{'modules' if layer_as_module else 'dicts'} in a {'module' if as_module else 'dict'}, "
        f"w read {reader}{', with a penalty' if penalty else ''}"
    )
    return RelaxedProblem(
        params=params,
        spec=tt.TieSpec(declarations),
        fn=make_relaxed_fn(stacked, reader, penalty),
        x=x,
        stacked=stacked,
        layers=layers,
        m=m,
        n=n,
        rank=rank,
        init=init,
        others=others,
        relax=relax,
        where=where,
        tied=tied,
        groups=groups,
        strategy=strategy_drawn,
        reader=reader,
        penalty=penalty,
        description=description,
    )

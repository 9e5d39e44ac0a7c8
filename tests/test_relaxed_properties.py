"""Property tests of relaxed ties (`tt.relaxed`) over recursive models drawn the way users write
them (tests/strategies.py `relaxed_problems`): a list of layers or a stacked layer scanned with
`lax.scan`, tied by a `share_layers` strategy (cycle, sequence, middle_cycle, middle_sequence;
lower, upper or averaged blocks) or by explicit `tt.group`s / `tt.stack`s, over whole layers or
their weight only, at a random rank with `init` svd or zeros and `others` shared or own, reading
the relaxed weight on either side of its matmul and sometimes outside one.

Each member reads `W + B_l @ A_l`. The reference is the untied function at that model,
`tt.unpack(packed)`: values equal, and the untied gradient `G_l` of a member pulls back to `G_l`
summed over the members for `W`, `G_l @ A_l.T` for `B_l` and `B_l.T @ G_l` for `A_l`. One property
asks `tietransform.testing.check_tied`; another computes those sums itself, in float64 NumPy.

Tolerances follow `tietransform.testing.tolerance`: `2 (k + 1) eps` for a result that sums `k`
terms, where the tied program reassociates `x @ (W + B A)` as `x @ W + (x @ B) @ A`, so every
relaxed read adds `m + n + r` terms that may round differently (`RelaxedProblem.relaxed_reads`).
A dropped, doubled or misrouted member or factor gradient is off by a whole member's gradient.

Examples cost mostly XLA compilation (each drawn function is new, and `tt.pack`'s factorisation
compiles per shape), so the compiled properties run a quarter of the hypothesis profile's
examples (3 in `ci`), the jaxpr property a third.
"""

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import tietransform as tt
from tests.helpers import equations
from tests.strategies import RelaxedProblem, path_key, relaxed_problems
from tietransform.testing import check_tied, tolerance, tree_allclose


_FEW = settings(max_examples=max(1, settings().max_examples // 4))
_THIRD = settings(max_examples=max(1, settings().max_examples // 3))


def _any_dtype(**kwargs: Any) -> st.SearchStrategy[RelaxedProblem]:
    """float32 problems of every size, or bfloat16 ones small enough (`small=True`) that the
    first-order bound of the reassociated sums stays far below 1: in bfloat16 (eps 2**-7) it
    exceeds 1 from ~60 terms, and could then not tell a dropped gradient from rounding."""
    return st.one_of(
        relaxed_problems(**kwargs),
        relaxed_problems(dtypes=(jnp.bfloat16,), small=True, **kwargs),
    )


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _promotion(dtype: Any) -> contextlib.AbstractContextManager:
    """Standard dtype promotion for bfloat16 models: `tt.pack` (and a relaxed read built outside a
    matmul) call `jnp.promote_types(bfloat16, float32)`, which strict promotion refuses (see
    `test_a_bfloat16_model_packs_under_strict_dtype_promotion`). The functions drawn never
    mix dtypes themselves."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jax.numpy_dtype_promotion("standard")
    return contextlib.nullcontext()


def _node(tree: Any, layer: int | None, name: str) -> Any:
    """Leaf `name` of layer `layer` (of the stacked layer when `layer` is None)."""
    blocks = tree["blocks"] if isinstance(tree, dict) else tree.blocks
    node = blocks if layer is None else blocks[layer]
    return node[name] if isinstance(node, dict) else getattr(node, name)


def _exceeds(what: str, error: float, bound: float) -> list[str]:
    """`[message]` when `error > bound`, else `[]`."""
    return [] if error <= bound else [f"{what}: error {error:.3g} > tolerance {bound:.3g}"]


def _per_layer(tree: Any, problem: RelaxedProblem) -> dict[str, list[Any]]:
    """Each leaf name's per-layer arrays (slices of a stacked layer)."""
    if problem.stacked:
        return {k: list(_node(tree, None, k)) for k in ("w", "b", "out")}
    return {k: [_node(tree, i, k) for i in range(problem.layers)] for k in ("w", "b", "out")}


# -- 1. values and gradients at W + B A ------------------------------------------------------
@given(_any_dtype())
@_FEW
def test_relaxed_tied_values_and_gradients_equal_the_untied_ones_at_w_plus_ba(problem):
    with _promotion(problem.x.dtype), jax.default_matmul_precision("highest"):
        check_tied(jax.jit(problem.fn), problem.spec, problem.params, problem.x)


@dataclasses.dataclass(frozen=True)
class _Expected:
    """One packed buffer's expected gradient: float64, the sum of its summands' magnitudes (for
    a normwise error), and how many terms each entry sums."""

    where: str
    got: Any
    expected: np.ndarray
    scale: float
    terms: int


def _factor_grads(
    where: str, got: Any, g: np.ndarray, b: np.ndarray, a: np.ndarray
) -> Iterator[_Expected]:
    """`G @ A.T` for `B` and `B.T @ G` for `A` (batched over a leading axis for stacks)."""
    at, bt = np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2)
    yield _Expected(
        f"{where}.lora_b",
        got.lora_b,
        g @ at,
        float(np.max(np.abs(g) @ np.abs(at), initial=0.0)),
        g.shape[-1] + 1,
    )
    yield _Expected(
        f"{where}.lora_a",
        got.lora_a,
        bt @ g,
        float(np.max(np.abs(bt) @ np.abs(g), initial=0.0)),
        g.shape[-2] + 1,
    )


def _summed(where: str, got: Any, parts: list[np.ndarray]) -> _Expected:
    scale = sum(float(np.max(np.abs(p), initial=0.0)) for p in parts)
    return _Expected(where, got, np.sum(parts, axis=0), scale, len(parts))


def _listed_expectations(
    problem: RelaxedProblem, packed: Any, grads: Any, full_grads: Any
) -> Iterator[_Expected]:
    for i in range(problem.layers):
        for name in ("w", "b", "out"):
            leaf, got = _node(packed, i, name), _node(grads, i, name)
            g = _f64(_node(full_grads, i, name))
            group = problem.group_of(i) if name in problem.tied else None
            where = f"blocks[{i}].{name}"
            if group is None or (name not in problem.relaxed_leaves and problem.others == "own"):
                assert eqx.is_array(leaf), (where, leaf)
                yield _summed(where, got, [g])
            elif name in problem.relaxed_leaves:
                assert isinstance(leaf, tt.RelaxedLeaf), (where, leaf)
                assert (leaf.shared is not None) == (i == group.canonical), (where, leaf)
                yield from _factor_grads(where, got, g, _f64(leaf.lora_b), _f64(leaf.lora_a))
                if i == group.canonical:  # W: every member's gradient
                    parts = [_f64(_node(full_grads, j, name)) for j in group.members]
                    yield _summed(f"{where}.shared", got.shared, parts)
            elif i == group.canonical:  # a non-matrix leaf tied strictly (others="shared")
                parts = [_f64(_node(full_grads, j, name)) for j in group.members]
                yield _summed(where, got, parts)
            else:
                assert isinstance(leaf, tt.TiedLeaf), (where, leaf)


def _stacked_expectations(
    problem: RelaxedProblem, packed: Any, grads: Any, full_grads: Any
) -> Iterator[_Expected]:
    layers = range(problem.layers)
    for name in ("w", "b", "out"):
        leaf, got = _node(packed, None, name), _node(grads, None, name)
        g = _f64(_node(full_grads, None, name))
        where = f"blocks.{name}"
        if name not in problem.tied or (name == "b" and problem.others == "own"):
            assert eqx.is_array(leaf), (where, leaf)
            yield _summed(where, got, [g])
            continue
        assert isinstance(leaf, tt.StackedLeaf), (where, leaf)
        # The kept rows partition the layers as the groups do: a row per group, one per other.
        for i in layers:
            for j in layers:
                same = i == j or (problem.group_of(i) or object()) is problem.group_of(j)
                assert (leaf.rows[i] == leaf.rows[j]) == same, (where, leaf.rows, problem.groups)
        for row in range(np.shape(leaf.data)[0]):
            members = [i for i in layers if leaf.rows[i] == row]
            yield _summed(f"{where}.data[{row}]", got.data[row], [g[i] for i in members])
        if name not in problem.relaxed_leaves:
            assert leaf.factor_rows is None, (where, leaf.factor_rows)
            continue
        assert leaf.factor_rows is not None, where
        relaxed = [i for i in layers if problem.group_of(i) is not None]
        assert [i for i in layers if leaf.factor_rows[i] >= 0] == relaxed, leaf.factor_rows
        index = [leaf.factor_rows[i] for i in relaxed]
        assert sorted(index) == list(range(np.shape(leaf.lora_b)[0])), leaf.factor_rows
        b, a = _f64(leaf.lora_b)[index], _f64(leaf.lora_a)[index]
        rows = np.asarray(index)
        reordered = dataclasses.replace(got, lora_b=got.lora_b[rows], lora_a=got.lora_a[rows])
        yield from _factor_grads(where, reordered, g[relaxed], b, a)


@given(_any_dtype())
@_FEW
def test_each_factor_gets_the_untied_gradient_pulled_back_through_w_plus_ba(problem):
    """Computed here, not by check_tied: `W` gets the members' untied gradients summed, `B_l`
    gets `G_l @ A_l.T`, `A_l` gets `B_l.T @ G_l`, strictly tied leaves the sum over members and
    every other leaf its own untied gradient, each of the dtype it is stored in."""
    dtype = problem.x.dtype
    with _promotion(dtype), jax.default_matmul_precision("highest"):
        packed = tt.pack(problem.params, problem.spec)
        full = tt.unpack(packed, problem.spec)
        value, grads = jax.jit(jax.value_and_grad(tt.tie(problem.fn, problem.spec)))(
            packed, problem.x
        )
        expected_value, full_grads = jax.jit(jax.value_and_grad(problem.fn))(full, problem.x)
    extra = problem.relaxed_reads()
    assert tolerance(dtype, 1 + extra) <= 0.25, "bfloat16 examples are drawn small"
    assert value.dtype == dtype
    error = abs(float(value) - float(expected_value)) / abs(float(expected_value))
    problems = _exceeds("value", error, tolerance(dtype, 1 + extra))
    expectations = _stacked_expectations if problem.stacked else _listed_expectations
    for e in expectations(problem, packed, grads, full_grads):
        assert e.got.dtype == dtype, (e.where, e.got.dtype)
        assert e.got.shape == e.expected.shape, (e.where, e.got.shape, e.expected.shape)
        error = float(np.max(np.abs(_f64(e.got) - e.expected), initial=0.0))
        error /= max(e.scale, np.finfo(np.float64).tiny)
        problems += _exceeds(e.where, error, tolerance(dtype, e.terms + extra))
    assert not problems, "\n".join(problems)


# -- 2. a full-rank SVD conversion is the untied model ---------------------------------------
@given(_any_dtype(full_rank=True))
@_FEW
def test_a_full_rank_svd_conversion_reproduces_the_untied_model_and_its_outputs(problem):
    """At rank `min(m, n)` with `init="svd"`, `unpack(pack(model))` is the model: every matrix to
    its dtype's rounding, every leaf not tied strictly bit for bit, and a bias tied strictly
    (`others="shared"`) holds its block's value. The tied function's output is then the untied
    one's on the original model."""
    dtype = problem.x.dtype
    with _promotion(dtype), jax.default_matmul_precision("highest"):
        packed = tt.pack(problem.params, problem.spec)
        restored = tt.unpack(packed, problem.spec)
        tied_value = jax.jit(tt.tie(problem.fn, problem.spec))(packed, problem.x)
        # The original model, but for the biases `others="shared"` ties strictly (checked below).
        original = jax.tree_util.tree_map_with_path(
            lambda path, p, r: r if path_key(path[-1]) == "b" else p, problem.params, restored
        )
        untied_value = jax.jit(problem.fn)(original, problem.x)
    leaves, got = _per_layer(problem.params, problem), _per_layer(restored, problem)
    rank, side = problem.rank, max(problem.m, problem.n)
    problems = []
    for name in ("w", "b", "out"):
        for i in range(problem.layers):
            want, have = _f64(leaves[name][i]), _f64(got[name][i])
            group = problem.group_of(i) if name in problem.tied else None
            if group is not None and name == "b" and problem.others == "shared":
                # Tied strictly: the block's value, its canonical layer's or the layers' mean.
                members = group.members if group.average else (group.canonical,)
                want = np.mean([_f64(leaves[name][j]) for j in members], axis=0)
                bound = tolerance(dtype, len(members)) * float(np.max(np.abs(want)))
            elif group is None or name == "b":  # untouched
                bound = 0.0
            else:
                # W + B A: the residual R = P - W rounded, its SVD in float32 (backward error a
                # few eps32 of |R|_2 per term of its max(m, n)-long sums), B and A rounded, their
                # `rank`-term product and W + B A rounded (relative to the entries): `rank +
                # max(m, n)` terms of |P| + |R|_2. (3000 random residuals of up to 4 x 4, f32:
                # at most 2.1 eps of that scale, against the bound's 10 eps or more.)
                members = group.members if group.average else (group.canonical,)
                residual = want - np.mean([_f64(leaves[name][j]) for j in members], axis=0)
                scale = float(np.max(np.abs(want))) + float(np.linalg.norm(residual, 2))
                bound = tolerance(dtype, rank + side) * scale
            error = float(np.max(np.abs(have - want)))
            problems += _exceeds(f"layer {i}'s {name}", error, bound)
    # The tied program: reassociated reads (m + n + r terms each) of a model that differs from
    # the original by conversion roundings (at most as many terms per read).
    terms = 1 + 2 * problem.relaxed_reads()
    error = abs(float(tied_value) - float(untied_value)) / abs(float(untied_value))
    problems += _exceeds("value", error, tolerance(dtype, terms))
    assert not problems, "\n".join(problems)


# -- 3. a strategy is its explicit groups, relaxed too ---------------------------------------
def _explicit(problem: RelaxedProblem) -> tt.TieSpec:
    """The groups (or stacks) a `share_layers` strategy stands for, written by hand from the
    strategy's definition (tests/strategies.py `strategy_blocks`), with the same `relax`."""
    declarations: dict[str, Any] = {}
    for j, g in enumerate(problem.groups):
        how = "average" if g.average else "canonical"
        if problem.stacked:
            declarations[f"by_hand_{j}"] = tt.stack(
                problem.where, list(g.members), canonical=g.canonical, init=how, relax=problem.relax
            )
        else:
            at = lambda i: problem.where.replace("[*]", f"[{i}]")  # noqa: E731
            declarations[f"by_hand_{j}"] = tt.group(
                *map(at, g.members), canonical=at(g.canonical), init=how, relax=problem.relax
            )
    return tt.TieSpec(declarations)


def _is_placeholder(x: Any) -> bool:
    return isinstance(x, tt.TiedLeaf | tt.StackedLeaf | tt.RelaxedLeaf)


def _arrays(tree: Any) -> list[np.ndarray]:
    """The arrays holding numbers (not the zero-size layout records, which name the groups)."""
    return [np.asarray(x) for x in jax.tree.leaves(tree) if eqx.is_array(x) and x.size]


@given(relaxed_problems(forms=("strategy",)))
@_FEW
def test_a_relaxed_strategy_packs_and_computes_exactly_as_its_explicit_groups(problem):
    explicit = _explicit(problem)
    with jax.default_matmul_precision("highest"):
        by_strategy = tt.pack(problem.params, problem.spec)
        by_hand = tt.pack(problem.params, explicit)
        out = {
            name: jax.jit(jax.value_and_grad(tt.tie(problem.fn, spec)))(packed, problem.x)
            for name, spec, packed in [
                ("strategy", problem.spec, by_strategy),
                ("by hand", explicit, by_hand),
            ]
        }
    # The same placeholders in the same places, holding the same numbers bit for bit (W, the
    # factors, from the same residuals and seeds); the same values and gradients.
    kinds = [
        [type(x).__name__ for x in jax.tree.leaves(t, is_leaf=_is_placeholder)]
        for t in (by_strategy, by_hand)
    ]
    assert kinds[0] == kinds[1]
    for got, want in [
        (_arrays(by_strategy), _arrays(by_hand)),
        (_arrays(out["strategy"]), _arrays(out["by hand"])),
    ]:
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


# -- 4. the rewrite keeps relaxed reads lazy -------------------------------------------------
@given(relaxed_problems(lazy_only=True))
@_THIRD
def test_relaxed_matmuls_never_build_w_plus_ba_nor_an_l_fold_stack(problem):
    """Forward and backward: no `dot_general` makes a member-shaped array from a factor (`B @ A`,
    in either orientation), and a scanned stack is never built `L`-fold (`lazy_only` draws
    `m != n` and `r < min(m, n)`, so no factor, input or gradient has those shapes)."""
    m, n, r, layers = problem.m, problem.n, problem.rank, problem.layers
    packed = tt.pack(problem.params, problem.spec)
    tied = tt.tie(problem.fn, problem.spec)
    factors = {(m, r), (r, n), (n, r), (r, m)}
    members = {(m, n), (n, m)}
    stacks = {(layers, m, n)} if problem.stacked else set()
    if stacks and "out" in problem.relaxed_leaves:
        stacks.add((layers, n, m))
    for program in (
        jax.make_jaxpr(tied)(packed, problem.x),
        jax.make_jaxpr(jax.grad(tied))(packed, problem.x),
    ):
        dots = [
            ({tuple(v.aval.shape) for v in e.invars}, tuple(e.outvars[0].aval.shape))
            for e in equations(program)
            if e.primitive is lax.dot_general_p
        ]
        assert any(ins & factors for ins, _ in dots), "no relaxed read went through its factors"
        built = [(ins, out) for ins, out in dots if out in members and ins & factors]
        assert not built, f"W + B A was built: {built}"
        shapes = {tuple(v.aval.shape) for e in equations(program) for v in e.outvars}
        assert not shapes & stacks, f"an L-fold stack was built: {shapes & stacks}"


# -- library bugs these properties found, fixed: each test below failed before its fix -------
@pytest.mark.parametrize("declared", ["relaxed", "average"])
def test_a_bfloat16_model_packs_under_strict_dtype_promotion(declared):
    model = {"a": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    if declared == "relaxed":
        spec = tt.TieSpec(g=tt.group("a", "b", relax=tt.relaxed(1)))
    else:
        spec = tt.TieSpec(g=tt.group("a", "b", init="average"))
    restored = tt.unpack(tt.pack(model, spec), spec)
    assert restored["b"].dtype == jnp.bfloat16


def test_check_tied_compares_bfloat16_values_at_bfloat16_tolerance():
    # One bfloat16 ulp at 1 (2**-7) is within tolerance(bfloat16) = 2 * 2 * 2**-7.
    got, expected = jnp.array([1.0], jnp.bfloat16), np.array([1.0 + 2.0**-7])
    assert tree_allclose(got, expected) == []


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda h, w: h @ w, id="h @ w"),
        pytest.param(lambda h, w: (w.T @ h.T).T, id="(w.T @ h.T).T"),
    ],
)
@pytest.mark.parametrize("relax", [None, tt.relaxed(1)], ids=["strict", "relaxed"])
def test_a_stacked_weight_read_in_a_scan_is_not_saved_l_fold(relax, read):
    layers, m, n = 4, 2, 3
    model = {"w": jnp.ones((layers, m, n)), "out": jnp.ones((layers, n, m))}
    spec = tt.TieSpec(w=tt.stack("w", relax=relax), out=tt.stack("out", relax=relax))

    def loss(model, x):
        body = lambda h, p: (jnp.tanh(read(h, p["w"])) @ p["out"], None)  # noqa: E731
        return jnp.sum(lax.scan(body, x, model)[0])

    grad = jax.grad(tt.tie(loss, spec))
    jaxpr = jax.make_jaxpr(grad)(tt.pack(model, spec), jnp.ones((5, m)))
    shapes = {tuple(v.aval.shape) for e in equations(jaxpr) for v in e.outvars}
    assert not shapes & {(layers, m, n), (layers, n, m)}

"""`pack_labels`: optimizer label and mask trees of the full model, on the packed params.

`optax.multi_transform`, `optax.masked` and the `mask=` of `optax.adamw` take a tree with the
params' structure (or a prefix of it). A tree written for the full model does not fit packed
params, and a label on a tied member has no buffer of its own to act on: a group has one buffer,
so it can have one label. `pack_labels` checks that, then puts each label where the packed params
keep the arrays: on every array child of a placeholder, whatever children it has.
"""

from collections.abc import Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax

from ._pack import pack, unpack
from ._paths import format_path
from ._placeholders import is_placeholder
from ._resolve import flatten, plan_for
from ._spec import TieSpec


PyTree = TypeVar("PyTree")

_SHOWN_MEMBERS = 8


def pack_labels(labels: Any, spec: TieSpec, params: PyTree) -> PyTree:
    """Map a label or mask tree of the full model onto packed params, for optimizers.

    **Arguments:**

    - `labels`: a tree with the full model's structure, or a prefix of it (as optax accepts), whose
      leaves are labels: strings for `optax.multi_transform`, booleans for `optax.masked` or the
      `mask=` of `optax.adamw`. Or a function from the full model to such a tree.
    - `spec`: the [`tietransform.TieSpec`][] of the packed params.
    - `params`: the packed params the optimizer will see (or the full model, which is packed with
      `spec` to find the packed structure).

    **Returns:**

    A tree with the packed params' structure, placeholders included: every array leaf carries the
    label of the member it stores (a canonical leaf its group's label, a
    [`tietransform.StackedLeaf`][]'s rows their array's label). Pass it where optax expects
    labels or a mask for the packed params.

    **Raises:**

    `ValueError` when members of one tie group have different labels (listing the members and
    their labels: a group has one buffer, so it trains or stays frozen as a whole), and when
    `labels` does not have the full model's structure or a prefix of it.
    """
    packed = params if _is_packed(params) else pack(params, spec, copy=False)
    flat = flatten(packed)
    keypaths, leaves, treedef = flat
    plan = plan_for(spec, flat)
    if callable(labels) and jax.tree_util.treedef_is_leaf(jax.tree.structure(labels)):
        labels = labels(unpack(packed, spec))  # a function (a Module is a tree of labels)
    full_labels = _broadcast(labels, treedef, [format_path(k) for k in keypaths])
    for slot in plan.slots:
        members = (slot.canonical, *slot.readers)
        if any(is_placeholder(leaves[r]) for r in slot.readers):  # a slot that ties arrays
            _check_agree(slot.group, [(plan.paths[i], full_labels[i]) for i in members])
    out = [
        jax.tree.map(lambda _, label=label: label, leaf) if is_placeholder(leaf) else label
        for leaf, label in zip(leaves, full_labels, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_packed(tree: Any) -> bool:
    return any(is_placeholder(x) for x in flatten(tree)[1])


def _broadcast(labels: Any, treedef: Any, paths: Sequence[str]) -> list[Any]:
    """One label per leaf of the full model, from a tree with its structure or a prefix of it."""
    if _is_packed(labels):
        raise ValueError(
            "tt.pack_labels takes labels for the full model, but these hold placeholders "
            "(TiedLeaf/StackedLeaf), as if built from the packed params. Such a tree already fits "
            "the packed params, with each group labelled by its canonical member. To have the "
            "labels of every member checked, build them from `tt.unpack(packed, spec)`."
        )
    skeleton = jax.tree_util.tree_unflatten(treedef, list(range(treedef.num_leaves)))
    label_leaves, label_treedef = jax.tree_util.tree_flatten(labels)
    try:
        covered = label_treedef.flatten_up_to(skeleton)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "tt.pack_labels: `labels` must have the structure of the full model, or a prefix of "
            f"it, with one label per leaf or subtree. ({error}) Build them from the model, e.g. "
            "`jax.tree.map(lambda x: 'train', tt.unpack(packed, spec))`, with `None` only where "
            "the model has `None`."
        ) from error
    out: list[Any] = [None] * len(paths)
    for label, subtree in zip(label_leaves, covered, strict=True):
        for index in jax.tree_util.tree_leaves(subtree):
            out[index] = label
    return out


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if eqx.is_array(a) or eqx.is_array(b):
        return False  # compared by identity only: `==` of arrays is elementwise
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_agree(group: str, members: Sequence[tuple[str, Any]]) -> None:
    canonical_label = members[0][1]
    if all(_same(label, canonical_label) for _, label in members[1:]):
        return
    width = max(len(path) for path, _ in members[:_SHOWN_MEMBERS])
    lines = [
        f"  {path:<{width}}  {label!r}" + ("  (canonical)" if i == 0 else "")
        for i, (path, label) in enumerate(members[:_SHOWN_MEMBERS])
    ]
    if len(members) > _SHOWN_MEMBERS:
        lines.append(f"  ... and {len(members) - _SHOWN_MEMBERS} more")
    raise ValueError(
        f"Members of tie group {group!r} have different optimizer labels:\n"
        + "\n".join(lines)
        + "\nThey share one buffer, which the optimizer updates as a whole: give them the same "
        "label (e.g. freeze all of them), or leave the member out of the tie group."
    )

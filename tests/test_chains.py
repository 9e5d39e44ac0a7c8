"""Chains of ties: a view whose source is a member of a plain group reads the group's buffer.

The T5/BART layout ties the encoder's and decoder's embeddings and reads the language-model head
as their transpose. The buffer's gradient is the sum over the plain members plus each view's
pullback, which is what the untied function gives at the unpacked model.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tietransform as tt
from tests.helpers import assert_trees_close
from tietransform.testing import check_tied


VOCAB, WIDTH = 6, 3


def _seq2seq(key):
    """A tiny encoder-decoder: separate embeddings, a mixing matrix, an untied LM head."""
    k = jax.random.split(key, 4)
    return {
        "encoder": {"embed": jax.random.normal(k[0], (VOCAB, WIDTH))},
        "decoder": {"embed": jax.random.normal(k[1], (VOCAB, WIDTH))},
        "mix": jax.random.normal(k[2], (WIDTH, WIDTH)),
        "lm_head": jax.random.normal(k[3], (WIDTH, VOCAB)),
    }


def _loss(params, tokens):
    memory = jnp.tanh(params["encoder"]["embed"][tokens] @ params["mix"])
    hidden = params["decoder"]["embed"][tokens] + jnp.mean(memory, axis=0, keepdims=True)
    logits = hidden @ params["lm_head"]
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


TOKENS = jnp.array([1, 4, 2, 5])


def _t5(source):
    return tt.TieSpec(
        emb=["encoder.embed", "decoder.embed"],
        head=tt.view(source, "lm_head", jnp.transpose),
    )


@pytest.mark.parametrize("source", ["encoder.embed", "decoder.embed"])
def test_view_of_a_tied_member_reads_the_groups_buffer(source, getkey):
    packed = tt.pack(_seq2seq(getkey()), _t5(source))
    head = packed["lm_head"]
    assert isinstance(head, tt.TiedLeaf) and head.source == "decoder.embed"  # the canonical
    assert isinstance(packed["encoder"]["embed"], tt.TiedLeaf)
    full = tt.unpack(packed, _t5(source))
    np.testing.assert_array_equal(full["lm_head"], packed["decoder"]["embed"].T)
    np.testing.assert_array_equal(full["encoder"]["embed"], packed["decoder"]["embed"])


@pytest.mark.parametrize("source", ["encoder.embed", "decoder.embed"])
def test_t5_tie_matches_the_untied_reference_in_values_and_gradients(source, getkey):
    check_tied(_loss, _t5(source), _seq2seq(getkey()), TOKENS)


@pytest.mark.parametrize("source", ["encoder.embed", "decoder.embed"])
def test_buffer_gradient_is_the_sum_over_members_and_the_heads_pullback_under_jit(source, getkey):
    spec = _t5(source)
    packed = tt.pack(_seq2seq(getkey()), spec)
    grads = jax.jit(jax.grad(tt.tie(_loss, spec)))(packed, TOKENS)
    untied = jax.grad(_loss)(tt.unpack(packed, spec), TOKENS)
    expected = untied["encoder"]["embed"] + untied["decoder"]["embed"] + untied["lm_head"].T
    assert_trees_close(grads["decoder"]["embed"], expected, summands=3)
    assert isinstance(grads["lm_head"], tt.TiedLeaf)


def test_several_views_may_read_one_source(getkey):
    params = {**_seq2seq(getkey()), "lm_head2": jnp.zeros((WIDTH, VOCAB))}
    spec = tt.TieSpec(
        head=tt.view("encoder.embed", "lm_head", jnp.transpose),
        head2=tt.view("encoder.embed", "lm_head2", lambda w: 2.0 * w.T),
    )

    def loss(p, tokens):
        return _loss(p, tokens) + jnp.sum(p["lm_head2"] ** 2)

    check_tied(loss, spec, params, TOKENS)
    full = tt.unpack(tt.pack(params, spec), spec)
    np.testing.assert_array_equal(full["lm_head2"], 2.0 * params["encoder"]["embed"].T)


def test_view_of_a_view_composes_the_functions(getkey):
    params = {**_seq2seq(getkey()), "neg_head": jnp.zeros((WIDTH, VOCAB))}
    spec = tt.TieSpec(
        neg=tt.view("lm_head", "neg_head", jnp.negative),  # reads a view's target
        head=tt.view("encoder.embed", "lm_head", jnp.transpose),
    )

    def loss(p, tokens):
        return _loss(p, tokens) + jnp.sum(jnp.sin(p["neg_head"]))

    check_tied(loss, spec, params, TOKENS)
    packed = tt.pack(params, spec)
    assert packed["neg_head"].source == "encoder.embed"
    full = tt.unpack(packed, spec)
    np.testing.assert_array_equal(full["neg_head"], -params["encoder"]["embed"].T)


def test_views_that_read_each_other_in_a_cycle_are_refused():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    spec = tt.TieSpec(u=tt.view("a", "b", jnp.transpose), v=tt.view("b", "a", jnp.transpose))
    with pytest.raises(ValueError, match=r"read each other in a cycle"):
        tt.pack(params, spec)


def test_a_view_reading_a_stacked_array_is_refused():
    params = {"w": jnp.ones((4, 2)), "h": jnp.ones((2, 4))}
    spec = tt.TieSpec(s=tt.stack("w"), h=tt.view("w", "h", jnp.transpose))
    with pytest.raises(ValueError, match=r"Tie groups 's' and 'h' overlap at w: view 'h' reads"):
        tt.pack(params, spec)


def test_a_view_target_inside_a_tie_group_is_still_refused(getkey):
    spec = tt.TieSpec(
        emb=["encoder.embed", "decoder.embed"],
        head=tt.view("mix", "encoder.embed", lambda w: jnp.tile(w, (2, 1))),
    )
    with pytest.raises(ValueError, match=r"Tie groups 'emb' and 'head' overlap at encoder.embed"):
        tt.pack(_seq2seq(getkey()), spec)


def test_describe_says_whose_buffer_a_chained_view_reads(getkey):
    spec = _t5("encoder.embed")
    text = tt.describe(tt.pack(_seq2seq(getkey()), spec), spec)
    assert "  head: encoder.embed, lm_head (reads the buffer of 'emb': decoder.embed)" in text


# Same array shapes, other layouts: each must refuse params packed under the T5 spec.
UNCHAINED = {
    "view of the canonical": tt.TieSpec(
        emb=["encoder.embed", "decoder.embed"],
        head=tt.view("decoder.embed", "lm_head", jnp.transpose),
    ),
    "view only": tt.TieSpec(head=tt.view("encoder.embed", "lm_head", jnp.transpose)),
    "group only": tt.TieSpec(emb=["encoder.embed", "decoder.embed"]),
}


REFUSED = r"(packed under another layout|do not match the spec)"


@pytest.mark.parametrize("other", UNCHAINED)
def test_params_packed_under_a_chain_are_refused_under_another_spec(other, getkey):
    packed = tt.pack(_seq2seq(getkey()), _t5("encoder.embed"))
    with pytest.raises(ValueError, match=REFUSED):
        tt.unpack(packed, UNCHAINED[other])
    with pytest.raises(ValueError, match=REFUSED):
        jax.jit(tt.tie(_loss, UNCHAINED[other]))(packed, TOKENS)


@pytest.mark.parametrize("other", UNCHAINED)
def test_a_file_saved_under_a_chain_does_not_load_into_another_specs_skeleton(
    other, getkey, tmp_path
):
    params = _seq2seq(getkey())
    eqx.tree_serialise_leaves(tmp_path / "p.eqx", tt.pack(params, _t5("encoder.embed")))
    with pytest.raises(RuntimeError, match="changed shape"):  # the layout records differ
        eqx.tree_deserialise_leaves(tmp_path / "p.eqx", tt.pack(params, UNCHAINED[other]))


def test_the_layout_record_refuses_a_chain_loaded_as_a_view_of_the_canonical(getkey):
    params = _seq2seq(getkey())
    other = UNCHAINED["view of the canonical"]  # same placeholders, same values, other layout
    saved, skeleton = tt.pack(params, _t5("encoder.embed")), tt.pack(params, other)
    # A loader that fills the skeleton's leaves in order, comparing no shapes.
    loaded = jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(saved))
    with pytest.raises(ValueError, match="packed under another layout"):
        tt.unpack(loaded, other)

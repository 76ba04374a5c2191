"""Attention outside transformers' AttentionInterface (Bloom, GPT-NeoX-Japanese, XGLM; CodeGen, GPT-J and Falcon before
5.25) on CPU (eager backend, fp32).

Such an attention module computes its scores in its own code, so bcg's attention function never runs: the probe sees
the module update the cache's keys and values itself, and the whole module runs as a break of its own (the layer's
attention mask, the live cache) while norms, MLP and residuals stay in the graph. Bloom's stack hands every layer
ALiBi biases it builds from the 2D padding mask and its attention the residual stream: a break gets the biases made for
the live call, the residual as the graph computed it; its decode steps take the breaks (no full graph).
"""

import pytest
import torch

import bcg
from test_continuation import check_continuations
from test_latent_attention import _pair, replayed_equal_to_eager
from tiny_models import left_padded_batch

OUTSIDE_INTERFACE = ["bloom", "gpt_neox_japanese", "xglm", "codegen", "gptj", "falcon"]


@pytest.mark.parametrize("model_type", OUTSIDE_INTERFACE)
def test_attention_outside_the_interface_is_a_break_of_its_own_and_equals_eager(model_type):
    reference, model = _pair(model_type)
    slots = replayed_equal_to_eager(reference, model)
    # one break per layer: its attention module, whole (on 5.25 Falcon's goes through the interface: attention breaks)
    assert len(slots) == model.config.num_hidden_layers
    assert all("Attention" in type(s.module).__name__ for s in slots)


def test_bloom_continuations_equal_eager():
    """A second generate() turn and k-token calls on a past: the ALiBi biases span the past keys of every sequence."""
    reference, model = _pair("bloom")
    handle = check_continuations(reference, model, backend="eager")
    stats = handle.stats()
    assert stats["rejects"] == {} and stats["replays"] >= 12 and stats["full_graph_replays"] == 0


def test_bloom_on_a_static_cache_equals_eager():
    """generate() hands the stack a padding mask as wide as the static cache; decode steps take the breaks."""
    reference, model = _pair("bloom")
    ids, mask = left_padded_batch()
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static",
                   disable_compile=True)
    expected = reference.generate(ids, attention_mask=mask, **options)
    handle = bcg.wrap_model(model, backend="eager")
    assert torch.equal(model.generate(ids, attention_mask=mask, **options), expected)
    stats = handle.stats()
    assert stats["rejects"] == {} and stats["replays"] == options["max_new_tokens"]
    assert stats["full_graph_replays"] == 0


def test_falcon_with_alibi_stays_eager_naming_why():
    """Falcon's stack folds its ALiBi biases into the attention mask it builds; bcg builds the masks without them, so a
    replay would attend without the biases: the model stays eager, with one warning naming the flag."""
    reference, model = _pair("falcon", alibi=True)
    with pytest.warns(bcg.BcgFallbackWarning, match="alibi=True: the stack folds position biases"):
        handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    assert handle.stats()["replays"] == 0 and handle.stats()["ready"] is False


def test_a_stack_making_its_own_positions_stays_eager_naming_why():
    """MPT's stack takes no position_ids (its attention gets ALiBi biases the stack builds): it stays eager, and the
    warning says so, not that this transformers is one bcg does not know."""
    reference, model = _pair("mpt")
    with pytest.warns(bcg.BcgFallbackWarning, match="takes no position_ids") as caught:
        handle = bcg.wrap_model(model, backend="eager")
    assert not any("version" in str(w.message) for w in caught)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    assert handle.stats()["replays"] == 0 and handle.stats()["ready"] is False

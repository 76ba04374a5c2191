"""Indexed / sparse attention (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, AXK2), DeepSeek-V4's compressed attention and Doge's
dynamic-mask attention on CPU (eager backend, fp32), on every transformers of the verified range.

Such an attention module runs an indexer that caches keys of its own and picks the past tokens each query attends to
(4 of them in most tests here, so the selection bites); DeepSeek-V4's compressor caches compressed blocks. On 5.24
and 5.25 the module attends to other tensors than its cache update returned (it caches latents); on 5.17 (layer type
``deepseek_sparse_attention``) it caches the expanded keys and values but attends under a mask of its own making (the
selection folded into the layer's mask, or handed to the attention function as indices). Either way the probe sees
it, and the whole module, its indexer or compressor inside, becomes a break of its own; the rest of the layer is
captured. Where a layer reuses an earlier layer's top-k selection (GLM-MoE-DSA and HY-V4 "shared" layers), the
selection goes from break to break, never through a graph. Doge makes its mask from the values it attends to: its
attention is a break of its own too.

Decode steps on a dynamic cache run as one graph on bcg's static stand-in (``static_cache``, on in the default mode):
a stand-in step computes what transformers computes on a StaticCache of the stand-in's positions, whose indexed layers
break exact ties among index scores otherwise than the dynamic cache's (random weights tie at the indexer's ReLU
zero). Tests comparing with eager's dynamic cache either take the breaks (``static_cache=False``) or keep every key in
use (``EVERY_KEY``).
"""

import copy
import pickle

import pytest
import torch
from transformers import DynamicCache, StaticCache, cache_utils

import bcg
import internals
from test_continuation import _cache_name, check_continuations
from test_decode import _assert_same_real_cache, _cache_of
from test_latent_attention import _pair, first_graph_slots, replayed_equal_to_eager

from sweep_architectures import left_padded_batch  # noqa: E402  (test_latent_attention put scripts/ on the path)

SPARSE_ATTENTION = ["deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2", "deepseek_v4"]
INDEXED = ["deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2"]
BITING = dict(index_topk=4)  # of the 9-token prompt's positions and more: the selection bites
EVERY_KEY = dict(index_topk=64)  # more than any call here holds positions: every key in use is selected
STEPS = 5


def _biting_pair(model_type: str, **fields):
    """``_pair`` with the indexer keeping 4 past tokens (DeepSeek-V4 as its config has it)."""
    return _pair(model_type, **(BITING if model_type in INDEXED else {}), **fields)


@pytest.mark.parametrize("model_type", SPARSE_ATTENTION)
def test_sparse_attention_is_a_break_of_its_own_and_equals_eager(model_type):
    """Prompt and decode steps through the breaks (``static_cache=False``; the stand-in's decode steps are checked
    below)."""
    reference, model = _biting_pair(model_type)
    slots = replayed_equal_to_eager(reference, model, static_cache=False)
    # one break per layer, each the whole attention module (its indexer or compressor inside it, not a break)
    assert len(slots) == model.config.num_hidden_layers
    assert all(s.attends and "Attention" in type(s.module).__name__ for s in slots)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "hy_v4"])
def test_a_shared_top_k_selection_goes_from_break_to_break(model_type):
    """Layers 1 and 3 reuse the selection of the layer before (every layer after the first is handed it): a second turn
    and continuations equal eager's."""
    indexers = ["full", "shared", "full", "shared"]
    reference, model = _biting_pair(model_type, indexer_types=indexers)
    handle = check_continuations(reference, model, backend="eager", static_cache=False)
    assert handle.stats()["rejects"] == {}
    assert [s.layer_idx for s in first_graph_slots(handle) if s.fed] == [1, 2, 3]


def test_a_stack_computing_on_a_selection_a_break_returned_stays_eager(monkeypatch):
    """A graph would replay such a computation with the capture's selection: bcg refuses loudly instead."""
    reference, model = _pair("hy_v4")
    layer_class = type(model.model.layers[0])
    original = layer_class.forward

    def forward(self, *args, **kwargs):
        hidden, topk = original(self, *args, **kwargs)
        return hidden, topk.clone()

    monkeypatch.setattr(layer_class, "forward", forward)
    stays_eager_with_a_warning(reference, model, "computes on a tensor a module break of HYV4Attention")


def stays_eager_with_a_warning(reference, model, match: str) -> None:
    """The wrapped model's first call warns (``match``), replays nothing and gives eager's logits on the real tokens."""
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    handle = bcg.wrap_model(model, backend="eager")
    with pytest.warns(bcg.BcgFallbackWarning, match=match):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    assert handle.stats()["replays"] == 0
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", INDEXED)
def test_indexed_layers_decode_a_static_cache_as_one_graph_per_step(model_type):
    """transformers' StaticCache keeps an indexed layer's indexer keys and their length counter beside its keys and
    values (StaticIndexedLayer; a layer reusing another's selection keeps none): a decode step updates them in place,
    so it is one graph, indexer inside. generate() gives eager's tokens, and a second call replays the same graph."""
    if not hasattr(cache_utils, "StaticIndexedLayer"):
        pytest.skip("this transformers has no StaticIndexedLayer: such steps take the breaks")
    reference, model = _biting_pair(model_type)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    steps = 5
    kwargs = dict(attention_mask=mask, max_new_tokens=steps + 1, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    for call in (1, 2):
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
        stats = handle.stats()
        assert stats["full_graph_replays"] == call * steps and stats["full_graphs"] == 1 and stats["rejects"] == {}


@pytest.mark.parametrize("model_type, fields", [
    ("deepseek_v32", {}), ("glm_moe_dsa", dict(indexer_types=["full", "shared", "full", "shared"]))])
def test_indexed_layers_decode_a_dynamic_cache_on_a_stand_in_as_one_graph_per_step(model_type, fields):
    """The default mode decodes generate()'s DynamicCache on a static stand-in holding every indexed layer's keys,
    values and indexer keys (none for a layer reusing another's selection) and both length counters: one graph per
    step, indexer inside. With every key in use selected, tokens and logits are eager's; the cache left behind (its
    layers reading the stand-in) holds eager's keys, values and indexer keys, copies and pickles as plain indexed
    layers, and a second turn on it (a 3-token continuation through the breaks, then stand-in steps) is eager's."""
    reference, model = _pair(model_type, **EVERY_KEY, **fields)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    kwargs = dict(max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    expected, got = (m.generate(ids, attention_mask=mask, **kwargs) for m in (reference, model))
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    stats = handle.stats()
    assert stats["full_graph_replays"] == STEPS and stats["full_graphs"] == 1 and stats["rejects"] == {}

    cache, expected_cache = _cache_of(got), _cache_of(expected)
    assert type(cache) is type(expected_cache)
    assert all(isinstance(layer, cache_utils.DynamicIndexedLayer) for layer in cache.layers)
    _assert_same_real_cache(cache, expected_cache, mask)
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert {type(layer) for layer in copied.layers} == {cache_utils.DynamicIndexedLayer}
        _assert_same_real_cache(copied, expected_cache, mask)

    turn = torch.cat([got.sequences, ids[:, -3:]], dim=1)
    turn_mask = torch.cat([mask, torch.ones_like(turn[:, mask.shape[1]:])], dim=1)
    second, expected_second = (m.generate(turn, attention_mask=turn_mask, past_key_values=c, **kwargs)
                               for m, c in ((model, cache), (reference, expected_cache)))
    assert torch.equal(second.sequences, expected_second.sequences)
    _assert_same_real_cache(_cache_of(second), _cache_of(expected_second), turn_mask)
    assert handle.stats()["full_graph_replays"] == 2 * STEPS and handle.stats()["rejects"] == {}


def _greedy_steps(model, ids, mask, static_positions: int | None = None) -> torch.Tensor:
    """The last position's logits of a prompt on a DynamicCache and of ``STEPS`` greedy decode steps (plain forward
    calls) on it or, given ``static_positions``, on a StaticCache of that many positions holding what the prompt cached
    (written by transformers' own ``update`` and ``update_indexer``): [B, 1 + STEPS, vocab]."""
    cache, name = DynamicCache(config=model.config), _cache_name(model)
    with torch.no_grad():
        logits = [model(ids, attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1]]
        if static_positions is not None:
            static = StaticCache(config=model.config, max_cache_len=static_positions)
            for i, layer in enumerate(cache.layers):
                static.update(layer.keys, layer.values, i)
                if layer.is_indexer_initialized:
                    static.update_indexer(layer.indexer_keys, i)
            cache = static
        for _ in range(STEPS):
            token = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits.append(model(token, attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("model_type, index_topk", [("deepseek_v32", 2), ("glm_moe_dsa", 4)])
def test_on_tied_index_scores_stand_in_steps_compute_what_a_static_cache_does(model_type, index_topk):
    """With a biting selection, exact ties among index scores (the indexer's ReLU zero) are broken otherwise by
    transformers' static indexed layers than by its dynamic ones: here eager's decode steps on a StaticCache of the
    stand-in's positions (after the same prompt on a DynamicCache) differ from its steps on the DynamicCache. The
    default mode's steps, one graph each on the stand-in, are the static cache's; exact mode's, through the breaks on
    the dynamic cache, are the dynamic cache's."""
    reference, model = _pair(model_type, index_topk=index_topk)
    ids, mask = left_padded_batch()
    dynamic = _greedy_steps(reference, ids, mask)
    static = _greedy_steps(reference, ids, mask, static_positions=internals.stand_in_positions(ids.shape[1]))
    assert (static - dynamic).abs().max() > 1e-2  # the two differ: each comparison below tells them apart

    handle = bcg.wrap_model(model, backend="eager")
    torch.testing.assert_close(_greedy_steps(model, ids, mask), static, atol=1e-4, rtol=1e-4)
    assert handle.stats()["full_graph_replays"] == STEPS and handle.stats()["rejects"] == {}

    bcg.unwrap_model(model)
    handle = bcg.wrap_model(model, backend="eager", mode="exact")
    torch.testing.assert_close(_greedy_steps(model, ids, mask), dynamic, atol=1e-4, rtol=1e-4)
    stats = handle.stats()
    assert stats["full_graph_replays"] == 0 and stats["replays"] == 1 + STEPS and stats["rejects"] == {}


@pytest.mark.parametrize("model_type, index_topk", [("deepseek_v32", 2), ("glm_moe_dsa", 4)])
def test_verification_names_tied_index_scores_where_a_stand_in_step_differs_from_eager(model_type, index_topk):
    """verify=True compares the first stand-in step with eager's on the dynamic cache; on tied index scores they differ
    by design, and the warning says so (not "please report") before that kind runs eagerly."""
    reference, model = _pair(model_type, index_topk=index_topk)
    ids, mask = left_padded_batch()
    handle = bcg.wrap_model(model, backend="eager", verify=True)
    with pytest.warns(bcg.BcgFallbackWarning, match="tied index scores") as caught:
        got = _greedy_steps(model, ids, mask)
    assert not any("Please report" in str(w.message) for w in caught)
    assert list(handle.stats()["verify"]["failed"]) == ["decode / stand-in / DynamicCache"]
    torch.testing.assert_close(got, _greedy_steps(reference, ids, mask), atol=1e-4, rtol=1e-4)  # eager's, after it


def test_attention_under_a_mask_of_its_own_is_a_break_of_its_own():
    """Doge adds a bias made from the values it attends to (``A`` is zero at init, which hides it: set it here) to the
    layer's mask; bcg's attention break would hand the attention function the layer's mask alone."""
    reference, model = _pair("doge")
    for twin in (reference, model):
        torch.manual_seed(5)
        for layer in twin.model.layers:
            layer.self_attn.A.data.normal_()
    slots = replayed_equal_to_eager(reference, model)
    assert [type(s.module).__name__ for s in slots if s.attends] == ["DogeAttention"] * model.config.num_hidden_layers

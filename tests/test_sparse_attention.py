"""Indexed / sparse attention (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, AXK2), DeepSeek-V4's compressed attention and Doge's
dynamic-mask attention on CPU (eager backend, fp32), on every transformers of the verified range.

Such an attention module runs an indexer that caches keys of its own and picks the past tokens each query attends to
(here 4 of them, so the selection bites); DeepSeek-V4's compressor caches compressed blocks. From 5.25 the module
attends to other tensors than its cache update returned; before (layer type ``deepseek_sparse_attention``) it caches
the expanded keys and values but attends under a mask of its own making (the selection folded into the layer's mask,
or handed to the attention function as indices). Either way the probe sees it, and the whole module, its indexer or
compressor inside, becomes a break of its own; the rest of the layer is captured. Where a layer reuses an earlier
layer's top-k selection (GLM-MoE-DSA and HY-V4 "shared" layers), the selection goes from break to break, never
through a graph. Doge makes its mask from the values it attends to: its attention is a break of its own too.
"""

import pytest
import torch
from transformers import cache_utils

import bcg
from test_continuation import check_continuations
from test_latent_attention import _pair, first_graph_slots, replayed_equal_to_eager

from sweep_architectures import left_padded_batch  # noqa: E402  (test_latent_attention put scripts/ on the path)

SPARSE_ATTENTION = ["deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2", "deepseek_v4"]


@pytest.mark.parametrize("model_type", SPARSE_ATTENTION)
def test_sparse_attention_is_a_break_of_its_own_and_equals_eager(model_type):
    reference, model = _pair(model_type)
    slots = replayed_equal_to_eager(reference, model)
    # one break per layer, each the whole attention module (its indexer or compressor inside it, not a break)
    assert len(slots) == model.config.num_hidden_layers
    assert all(s.attends and "Attention" in type(s.module).__name__ for s in slots)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "hy_v4"])
def test_a_shared_top_k_selection_goes_from_break_to_break(model_type):
    """Layers 1 and 3 reuse the selection of the layer before (every layer after the first is handed it): a second turn
    and continuations equal eager's."""
    indexers = ["full", "shared", "full", "shared"]
    reference, model = _pair(model_type, indexer_types=indexers)
    handle = check_continuations(reference, model, backend="eager")
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


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2"])
def test_indexed_layers_decode_a_static_cache_as_one_graph_per_step(model_type):
    """transformers' StaticCache keeps an indexed layer's indexer keys and their length counter beside its keys and
    values (StaticIndexedLayer; a layer reusing another's selection keeps none): a decode step updates them in place,
    so it is one graph, indexer inside. generate() gives eager's tokens, and a second call replays the same graph."""
    if not hasattr(cache_utils, "StaticIndexedLayer"):
        pytest.skip("this transformers has no StaticIndexedLayer (before 5.25): such steps take the breaks")
    reference, model = _pair(model_type)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    steps = 5
    kwargs = dict(attention_mask=mask, max_new_tokens=steps + 1, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    for call in (1, 2):
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
        stats = handle.stats()
        assert stats["full_graph_replays"] == call * steps and stats["full_graphs"] == 1 and stats["rejects"] == {}


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

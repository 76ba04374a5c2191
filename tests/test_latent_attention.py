"""Multi-head latent attention (DeepSeek-V3, MiniCPM3, GLM-4-MoE-Lite, Kimi-Linear, ...) on CPU (eager backend, fp32).

Such an attention module caches compressed latents and expands them into keys and values after the cache update, so
bcg's attention break (which caches what the attention function receives) cannot stand in for its update. The probe
sees it attend to other tensors than its cache update returned, and the whole module becomes a break of its own:
projections, norms and MoE around it stay in the graph. Every family listed replays with eager's logits and tokens,
also when a returned cache is continued, with zero rejects.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import internals
from test_architectures import wrapped_equals_eager
from test_continuation import check_continuations

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from sweep_architectures import left_padded_batch, small_config  # noqa: E402

LATENT_ATTENTION = [
    "deepseek_v2", "deepseek_v3", "axk1", "minicpm3", "glm4_moe_lite", "kimi_linear", "youtu", "bailing_hybrid"]
GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def _pair(model_type: str, **fields):
    """Two equal models of the sweep's small config of ``model_type`` (``fields`` set on that config)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    config = small_config(model_type)
    for name, value in fields.items():
        setattr(config, name, value)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config).eval())
    return models


def first_graph_slots(handle) -> list:
    """The break slots of the first graph the handle captured."""
    return internals.slots(handle, internals.without_experts(handle.stats()["captured_graphs"][0].split(":")[0]))


def replayed_equal_to_eager(reference, model, **wrap) -> list:
    """``model`` wrapped (``wrap``: more options) gives ``reference``'s logits and tokens on the padded batch, every
    call replayed with no rejects; the break slots of its first graph."""
    ids, mask = left_padded_batch()
    handle, _ = wrapped_equals_eager(reference, model, ids, mask, GENERATE, **wrap)
    stats = handle.stats()
    assert stats["ready"] and stats["rejects"] == {} and stats["replays"] == 1 + GENERATE["max_new_tokens"]
    return first_graph_slots(handle)


@pytest.mark.parametrize("model_type", LATENT_ATTENTION)
def test_latent_attention_is_a_break_of_its_own_and_equals_eager(model_type):
    slots = replayed_equal_to_eager(*_pair(model_type))
    attending = [s for s in slots if getattr(s, "attends", False)]
    assert attending and all("Attention" in type(s.module).__name__ for s in attending)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_linear"])
@pytest.mark.parametrize("options", [{}, {"static_cache": False}])
def test_latent_attention_continuations_equal_eager(model_type, options):
    """A second generate() turn and k-token calls on a past; decode steps as one graph on a stand-in (default) or
    through the breaks."""
    reference, model = _pair(model_type)
    handle = check_continuations(reference, model, backend="eager", **options)
    assert handle.stats()["rejects"] == {}
    assert (handle.stats()["full_graph_replays"] > 0) == (not options and model_type == "deepseek_v3")


def test_decoder_layers_holding_two_attention_layers_replay():
    """LongCat-Flash's decoder layers each hold two latent-attention sublayers (cache layers 2i and 2i + 1): its stack
    is the ModuleList of num_hidden_layers / 2 layers, and every sublayer is a break of its own."""
    reference, model = _pair("longcat_flash", num_layers=2, num_hidden_layers=4)  # 5.17 keeps both fields
    assert len(model.model.layers) == 2
    slots = replayed_equal_to_eager(reference, model)
    assert [s.layer_idx for s in slots if s.attends] == [0, 1, 2, 3]

"""fused_kernels: which model code counts as Llama's, that the swap is undone, that CPU input keeps the model's code.

The kernels themselves run on CUDA: their parity with eager is in tests/test_gpu.py.
"""

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

import bcg
from bcg.fusion import find_fusions, is_llama_rms_norm
from tiny_models import left_padded_batch, tiny_model


def test_qwen3_every_norm_and_its_rotary_are_found():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    layers = model.config.num_hidden_layers
    # input + post-attention + q + k norms per layer, and the final norm
    assert len(fusions.norms) == 4 * layers + 1
    assert fusions.rotary_modules == [modeling_qwen3]
    assert fusions.describe() == {"rms_norm": 4 * layers + 1, "rotary": 1, "unmatched": []}


def test_a_kernelizable_rotary_function_object_is_looked_through(monkeypatch):
    """transformers 5.25 (with the kernels package) turns apply_rotary_pos_emb into a module object wrapping the
    function; the matcher compares the function inside (simulated here on any version)."""
    from bcg import hf

    function = hf.plain_function(modeling_qwen3.apply_rotary_pos_emb)

    class Func(torch.nn.Module):  # what kernels' use_kernel_forward_from_hub makes of a function
        kernel_layer_name = "rotary_pos_emb"

        def forward(self, *args, **kwargs):
            return function(*args, **kwargs)

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", Func())
    assert find_fusions(tiny_model("qwen3").model).rotary_modules == [modeling_qwen3]


@pytest.mark.parametrize("arch, norms, rotary, unmatched", [("gemma", 0, True, ["GemmaRMSNorm"]),
                                                            ("gpt2", 0, False, []), ("phi", 0, True, [])])
def test_code_that_differs_from_llama_is_left_alone_and_named(arch, norms, rotary, unmatched):
    # Gemma's norm scales by (1 + weight), GPT-2 and Phi use LayerNorm, GPT-2 has no rotary code.
    fusions = find_fusions(tiny_model(arch).model if arch != "gpt2" else tiny_model(arch).transformer)
    assert len(fusions.norms) == norms
    assert bool(fusions.rotary_modules) == rotary
    assert fusions.unmatched == unmatched


def test_rotary_code_that_differs_from_llama_is_named(monkeypatch):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # a rewrite that computes in another order
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    fusions = find_fusions(tiny_model("qwen3").model)
    assert fusions.rotary_modules == [] and fusions.unmatched == ["modeling_qwen3.apply_rotary_pos_emb"]


def test_a_subclass_with_its_own_forward_is_not_llama():
    class ScaledNorm(modeling_llama.LlamaRMSNorm):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    assert is_llama_rms_norm(modeling_llama.LlamaRMSNorm(8))
    assert not is_llama_rms_norm(ScaledNorm(8))


def test_installed_swaps_for_one_run_and_restores_even_after_an_error():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    original_rotary = modeling_qwen3.apply_rotary_pos_emb
    norm = fusions.norms[0]
    with pytest.raises(KeyError):
        with fusions.installed():
            assert modeling_qwen3.apply_rotary_pos_emb is not original_rotary
            assert "forward" in norm.__dict__
            raise KeyError("boom")
    assert modeling_qwen3.apply_rotary_pos_emb is original_rotary
    assert all("forward" not in n.__dict__ for n in fusions.norms)


def test_cpu_tensors_run_the_models_own_code_while_installed():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with find_fusions(model.model).installed():
            swapped = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(swapped, reference)


def test_fused_kernels_refuse_a_cpu_model_and_non_bool_values():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="CUDA only"):
        bcg.wrap_model(model, backend="eager", fused_kernels=True)
    with pytest.raises(ValueError, match="fused_kernels must be True, False or None"):
        bcg.wrap_model(model, backend="eager", fused_kernels="yes")
    assert not hasattr(model, "_bcg_handle")


def test_a_forward_set_on_a_norm_after_wrapping_is_left_in_place():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    norm = fusions.norms[0]
    own = norm.forward  # e.g. a hook library's instance-level forward
    norm.forward = own
    with fusions.installed():
        assert norm.forward is own
    assert norm.forward is own


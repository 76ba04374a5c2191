"""fused_kernels: which model code counts as Llama's, that the swap is undone, that CPU input keeps the model's code.

The kernels run on CUDA: their parity with eager is in tests/test_gpu.py; where triton is installed, its interpreter
runs them on CPU here too (tests/interpreted_kernels.py).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

import bcg
from bcg import fusion
from bcg.fusion import (find_fusions, is_llama_decoder_layer, is_llama_rms_norm, is_llama_swiglu,
                        is_one_input_qkv_attention, is_qk_norm_rotary_attention)
from tiny_models import left_padded_batch, tiny_model


def test_qwen3_every_norm_its_rotary_mlps_and_layers_are_found():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    layers = model.config.num_hidden_layers
    # input + post-attention + q + k norms per layer, and the final norm
    assert len(fusions.norms) == 4 * layers + 1
    assert fusions.rotary_modules == [modeling_qwen3]
    assert fusions.mlps == [layer.mlp for layer in model.model.layers]
    assert fusions.layers == list(model.model.layers)
    assert fusions.attentions == fusions.qkv_attentions == [layer.self_attn for layer in model.model.layers]
    assert fusions.describe() == {"rms_norm": 4 * layers + 1, "rotary": 1, "swiglu": layers, "add_rms_norm": layers,
                                  "qk_norm_rotary": layers, "cache_write": layers, "qkv_gemm": 0, "gate_up_gemm": 0,
                                  "unmatched": []}  # nothing merged until merge_projections (wrap time)


@pytest.mark.parametrize("arch, qkv", [("llama", True), ("qwen3", True), ("qwen3_moe", True), ("granite", True),
                                       ("mistral", False), ("qwen2", False), ("gpt2", False)])
def test_attention_with_llamas_or_qwen3s_forward_calls_its_qkv_on_one_input(arch, qkv):
    """Their forwards call q_proj, k_proj and v_proj on the same hidden states; Mistral's and Qwen2's pass a sliding
    window on (other code), GPT-2 projects q/k/v in one Conv1D already."""
    model = tiny_model(arch)
    stack = model.model if arch != "gpt2" else model.transformer
    attentions = [layer.self_attn for layer in model.model.layers] if qkv else []
    assert find_fusions(stack).qkv_attentions == attentions


@pytest.mark.parametrize("arch, attentions, cache_layers", [("qwen3_moe", 2, 2), ("llama", 0, 2), ("mistral", 0, 0),
                                                            ("gemma2", 0, 1), ("qwen3_5_text", 0, 0)])
def test_qk_norm_attention_and_cache_writes_are_counted(arch, attentions, cache_layers):
    """Qwen3-MoE runs Qwen3's attention; Llama's has no q/k norms; a StaticCache of Mistral's config (sliding window
    6) has sliding layers only, of Gemma 2's a full layer beside a sliding one; a hybrid's decode steps take breaks."""
    fused = find_fusions(tiny_model(arch).model).describe()
    assert (fused["qk_norm_rotary"], fused["cache_write"]) == (attentions, cache_layers)


def test_attention_whose_code_or_norms_differ_from_qwen3s_keeps_its_norms():
    """Only Qwen3's forward hands its q/k norms' outputs to the rotary call and nowhere else; a subclass with a forward
    of its own, a norm other than Llama's or a modeling module whose rotary bcg does not swap leaves the norms alone."""
    class ScaledAttention(modeling_qwen3.Qwen3Attention):
        def forward(self, *args, **kwargs):
            output, weights = super().forward(*args, **kwargs)
            return 2 * output, weights

    model = tiny_model("qwen3")
    first, second = (layer.self_attn for layer in model.model.layers)
    assert is_qk_norm_rotary_attention(first)
    scaled = ScaledAttention(model.config, layer_idx=1)
    assert not is_qk_norm_rotary_attention(scaled)
    model.model.layers[1].self_attn = scaled
    assert find_fusions(model.model).attentions == [first]
    first.k_norm = Qwen3_5RMSNorm(16)  # scales by (1 + weight)
    assert not is_qk_norm_rotary_attention(first)
    assert not is_qk_norm_rotary_attention(tiny_model("llama").model.layers[0].self_attn)  # no q/k norms
    assert is_one_input_qkv_attention(first) and not is_one_input_qkv_attention(scaled)


def test_qk_norm_attention_needs_its_modules_rotary_swapped(monkeypatch):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # a rewrite bcg does not fuse
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    fusions = find_fusions(tiny_model("qwen3").model)
    assert fusions.rotary_modules == [] and fusions.attentions == []


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


def test_swiglu_is_llamas_mlp_code_with_a_silu():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    assert is_llama_swiglu(mlp)
    mlp.act_fn = torch.nn.SiLU()  # hidden_act="swish"
    assert is_llama_swiglu(mlp)
    mlp.act_fn = torch.nn.GELU()  # the same code with another activation (Gemma's MLP): not SwiGLU, not named
    assert not is_llama_swiglu(mlp) and find_fusions(model.model).unmatched == []


def test_mlps_and_layers_whose_code_differs_from_llamas_are_named():
    class ScaledMLP(modeling_llama.LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model("llama")
    model.model.layers[1].mlp = ScaledMLP(model.config)
    fusions = find_fusions(model.model)
    assert fusions.mlps == [model.model.layers[0].mlp] and fusions.unmatched == ["ScaledMLP"]
    # Mixtral's layer passes attention its arguments in another order: its add is not fused
    mixtral = find_fusions(tiny_model("mixtral").model)
    assert mixtral.layers == [] and mixtral.unmatched == ["MixtralDecoderLayer"]


def test_a_layer_is_fused_only_with_llamas_norm_after_attention():
    # Gemma's layer runs Llama's code, but its norm scales by (1 + weight): neither fused nor named as a layer
    gemma = tiny_model("gemma").model
    assert not is_llama_decoder_layer(gemma.layers[0])
    assert find_fusions(gemma).unmatched == ["GemmaRMSNorm"]
    assert is_llama_decoder_layer(tiny_model("llama").model.layers[0])


def test_installed_swaps_for_one_run_and_restores_even_after_an_error():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    cache = _allocated_static_cache(model)
    original_rotary = modeling_qwen3.apply_rotary_pos_emb
    swapped = [*fusions.norms, *fusions.mlps, *fusions.layers]
    with pytest.raises(KeyError):
        with fusions.installed(cache):
            assert modeling_qwen3.apply_rotary_pos_emb is not original_rotary
            assert all("forward" in module.__dict__ for module in swapped)
            assert all("update" in vars(layer) for layer in cache.layers)
            raise KeyError("boom")
    assert modeling_qwen3.apply_rotary_pos_emb is original_rotary
    assert all("forward" not in module.__dict__ for module in swapped)
    assert all("update" not in vars(layer) for layer in cache.layers)


def _allocated_static_cache(model: torch.nn.Module) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=8)
    cache.early_initialization(1, model.config.num_key_value_heads, 16, model.dtype, model.device)
    return cache


def test_only_a_static_caches_plain_layers_update_through_the_fused_write():
    """A layer with an update of its own keeps it; no cache, a dynamic cache, an unallocated static cache or a stack
    whose config makes no plain static layers (cache_layers 0) gets no fused write."""
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    cache = _allocated_static_cache(model)
    own = cache.layers[1].update
    cache.layers[1].update = own
    with fusions.installed(cache):
        assert "update" in vars(cache.layers[0]) and cache.layers[1].update is own
    assert "update" not in vars(cache.layers[0]) and cache.layers[1].update is own
    for other in (None, DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=8)):
        with fusions.installed(other):
            assert all("update" not in vars(layer) for layer in getattr(other, "layers", ()))
    cache = _allocated_static_cache(model)
    fusions.cache_layers = 0
    with fusions.installed(cache):
        assert all("update" not in vars(layer) for layer in cache.layers)


def test_a_q_norm_output_that_never_reaches_the_rotary_call_fails_the_run(monkeypatch):
    """The q/k norms hand their input on unnormed for the rotary call to norm: a run in which a norm's output goes
    elsewhere (code other than Qwen3's) raises rather than compute on unnormed heads, and the swap is undone."""
    monkeypatch.setattr(fusion, "_kernels_take", lambda *tensors: True)  # as CUDA tensors would be
    model = tiny_model("qwen3")
    attention = model.model.layers[0].self_attn
    fusions = find_fusions(model.model)
    heads, rotary = torch.randn(1, 3, 4, 16), modeling_qwen3.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="never reached a rotary call"):
        with fusions.installed():
            assert attention.q_norm(heads) is heads
    assert "forward" not in attention.q_norm.__dict__ and modeling_qwen3.apply_rotary_pos_emb is rotary
    cos = sin = torch.ones(1, 3, 16)
    with pytest.raises(RuntimeError, match="reached other code"):
        with fusions.installed():
            q, k = attention.q_norm(heads), attention.k_norm(heads[:, :, :2])
            modeling_qwen3.apply_rotary_pos_emb(q.transpose(1, 2).contiguous(), k.transpose(1, 2), cos, sin)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_cpu_tensors_run_the_models_own_code_while_installed(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with find_fusions(model.model).installed():
            swapped = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(swapped, reference)


def test_bcgs_layer_forward_calls_attention_as_the_models_does():
    """Every argument but the hidden states reaches attention by name, as the installed transformers' Llama layer
    passes it (the cache under its name, defaults included), and the layer returns what the model's returns."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    calls = []
    layer.self_attn.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                              with_kwargs=True)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    position_ids = torch.arange(5).expand(2, 5)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    outputs = []
    with torch.no_grad():
        outputs.append(layer(hidden, position_ids=position_ids, position_embeddings=embeddings, output_extra=1))
        with find_fusions(model.model).installed():
            outputs.append(layer(hidden, None, position_ids, position_embeddings=embeddings, output_extra=1))
    (model_args, model_kwargs), (bcg_args, bcg_kwargs) = calls
    assert model_args == bcg_args == ()
    assert torch.equal(bcg_kwargs.pop("hidden_states"), model_kwargs.pop("hidden_states"))
    assert model_kwargs.keys() == bcg_kwargs.keys()
    assert all(bcg_kwargs[name] is value for name, value in model_kwargs.items())
    assert torch.equal(outputs[1], outputs[0])


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


def test_an_attention_with_a_forward_set_after_wrapping_keeps_its_norms():
    """Its norms run where it calls them (fused, as any Llama RMSNorm): its code may not hand them to the rotary."""
    def deferred(norm: torch.nn.Module) -> bool:
        forward = norm.__dict__.get("forward")
        return isinstance(getattr(getattr(forward, "func", None), "__self__", None), fusion._DeferredNorms)

    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    first, second = (layer.self_attn for layer in model.model.layers)
    first.forward = first.forward  # e.g. a hook library's
    with fusions.installed():
        assert not deferred(first.q_norm) and not deferred(first.k_norm) and "forward" in first.q_norm.__dict__
        assert deferred(second.q_norm) and deferred(second.k_norm)


def test_a_forward_set_on_an_mlp_layer_or_its_norm_after_wrapping_is_left_in_place():
    model = tiny_model("qwen3")
    fusions = find_fusions(model.model)
    first, second = model.model.layers
    hooked = [first, first.mlp, second.post_attention_layernorm]
    for module in hooked:
        module.forward = module.forward
    with fusions.installed():
        assert all(module.forward is module.__dict__["forward"] for module in hooked)
        assert "forward" not in second.__dict__  # its norm runs someone else's code: the add stays the model's
        assert "forward" in second.mlp.__dict__
    assert "forward" not in second.mlp.__dict__


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_kernels_match_eager_under_tritons_interpreter():
    """tests/interpreted_kernels.py in a subprocess: triton picks its interpreter when the kernels are defined."""
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "interpreted_kernels.py")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=tests.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


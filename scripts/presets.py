"""Benchmark models: random-initialised real shapes built from their published configs (no downloads), or any HF id.

Speed does not depend on weight values, so a preset builds the exact architecture with transformers' own
initialisation (normal(0, 0.02) weights, unit norms) straight on the target device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from bcg import hf

GIB = 2**30

_QWEN3 = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, attention_bias=False,
              hidden_act="silu", bos_token_id=151643, eos_token_id=151645)

# transformers' Qwen3_5TextConfig values the Qwen3.5-like shapes share
_QWEN3_5 = dict(vocab_size=248320, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, bos_token_id=248044, eos_token_id=248044)


@dataclass(frozen=True)
class Preset:
    """A model shape: the transformers model type, its config values and where they were published."""

    model_type: str
    config: dict[str, Any]
    source: str
    large: bool = False  # needs most of an 80 GB GPU
    notes: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ), source="none (CPU self-test shape)"),
    "qwen3-0.6b": Preset("qwen3", dict(
        _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, tie_word_embeddings=True,
    ), source="Qwen/Qwen3-0.6B"),
    "qwen3-8b": Preset("qwen3", dict(
        _QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=False,
    ), source="Qwen/Qwen3-8B"),
    "llama-3.1-8b": Preset("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attention_bias=False, mlp_bias=False, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ), source="meta-llama/Llama-3.1-8B"),
    "qwen3-30b-a3b": Preset("qwen3_moe", dict(
        _QWEN3, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, tie_word_embeddings=False,
    ), source="Qwen/Qwen3-30B-A3B", large=True,
        notes="MoE, ~61 GB of bf16 weights: fits an 80 GB H100 with ~15 GB to spare; use small grids"),
    # Qwen3.5's layout (three Gated DeltaNet layers, then one full-attention layer; transformers'
    # Qwen3_5TextConfig defaults, an 8.95 B model) scaled to 2048 x 24 layers: fits any benchmark GPU with room.
    "qwen3.5-like-2b": Preset("qwen3_5_text", dict(
        _QWEN3_5, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True,
    ), source="transformers' Qwen3_5TextConfig defaults, scaled (random init)",
        notes="hybrid: 18 Gated DeltaNet + 6 attention layers"),
    # The issue's shape: transformers' Qwen3_5TextConfig defaults as they are (8.95 B parameters, ~18 GB in bf16).
    "qwen3.5-like-9b": Preset("qwen3_5_text", dict(
        _QWEN3_5, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=False,
    ), source="transformers' Qwen3_5TextConfig defaults (random init)",
        notes="hybrid: 24 Gated DeltaNet + 8 attention layers"),
    # Multi-head latent attention + 64 routed experts (2 shared, 6 per token; the first layer dense): DeepSeek-V2-Lite's
    # published config, random init (15.7 B parameters, ~31 GB in bf16).
    "deepseek-v2-lite-like": Preset("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, bos_token_id=100000,
        eos_token_id=100001, tie_word_embeddings=False,
    ), source="deepseek-ai/DeepSeek-V2-Lite (config values, random init)",
        notes="MLA (latent KV cache) + MoE, ~31 GB of bf16 weights"),
    # DeepSeek Sparse Attention: DeepSeek-V3.2's attention per layer (MLA latents, q_lora_rank 1536, a 64-head x 128
    # indexer keeping the top 2048 past tokens) on DeepSeek-V2-Lite's body (27 layers, hidden 2048, 16 heads, 64 routed
    # experts, 6 per token): V3.2 itself (671 B) fits no single GPU. Random init.
    "deepseek-v3.2-small-like": Preset("deepseek_v32", dict(
        vocab_size=129280, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_group=1, topk_group=1, routed_scaling_factor=2.5, index_n_heads=64, index_head_dim=128,
        index_topk=2048, max_position_embeddings=163840, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    ), source="deepseek-ai/DeepSeek-V3.2 attention and indexer sizes on DeepSeek-V2-Lite's body (random init)",
        notes="DSA (indexer + sparse MLA) + MoE, ~32 GB of bf16 weights"),
}


def preset_config(name: str) -> PreTrainedConfig:
    preset = PRESETS[name]
    return AutoConfig.for_model(preset.model_type, **preset.config)


def build_model(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> PreTrainedModel:
    """A preset (random weights, built on ``device``) or, for any other name, ``from_pretrained(name)``."""
    torch.manual_seed(seed)
    if name not in PRESETS:
        return _load_pretrained(name, device, dtype)
    config = preset_config(name)
    _check_fits(name, config, device, dtype)
    if PRESETS[name].large:
        print(f"building large preset {name}: {PRESETS[name].notes}")
    # Built under the device context so multi-GB weights are allocated and initialised on the GPU directly.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    if device.type != "cuda":
        # No device_map on CPU: bcg reads a CPU device_map as weights offloaded from a GPU and stays eager.
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=str(device)).eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of all distinct parameters (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_fits(name: str, config: PreTrainedConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse early, with the numbers, when the weights alone would not fit on the GPU."""
    if device.type != "cuda":
        return
    with torch.device("meta"):
        needed = parameter_bytes(AutoModelForCausalLM.from_config(config, dtype=dtype))
    free, _ = torch.cuda.mem_get_info(device)
    headroom = 4 * GIB  # activations, caches and graphs of a small grid
    if needed + headroom > free:
        raise SystemExit(f"preset {name}: {needed / GIB:.1f} GiB of weights + {headroom / GIB:.0f} GiB headroom "
                         f"do not fit in the {free / GIB:.1f} GiB free on {torch.cuda.get_device_name(device)}")


def decode_weight_bytes(model: PreTrainedModel) -> int:
    """Weight bytes one decode step reads: all weights except an untied input embedding (only B rows are read).

    For MoE models this counts every expert: an upper bound at small batches, where only the routed experts are read.
    """
    total = parameter_bytes(model)
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embeddings:
        total -= embeddings.numel() * embeddings.element_size()
    return total


def kv_bytes_per_token(config: PreTrainedConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one cached token holds across the attention layers (full attention assumed; a hybrid model's
    mixer layers hold a fixed-size state instead, left out)."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return hf.attention_layers(text, text.num_hidden_layers) * 2 * kv_heads * head_dim * dtype.itemsize


def pad_token_id(config: PreTrainedConfig) -> int:
    """The pad id HF users end up with: the config's, else the (first) EOS id, else 0."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    eos = config.eos_token_id
    if isinstance(eos, list):
        return eos[0]
    return 0 if eos is None else eos


def describe(name: str, model: PreTrainedModel) -> dict[str, Any]:
    """What a results file says about the model it measured."""
    preset = PRESETS.get(name)
    return {
        "model": name,
        "class": type(model).__name__,
        "source": preset.source if preset else name,
        "random_weights": preset is not None,
        "notes": preset.notes if preset else "",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_gib": round(parameter_bytes(model) / GIB, 3),
        "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
    }

"""Tiny random-initialised models built from configs (no downloads), one per architecture bcg supports."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_GEMMA_KV_SHARING = dict(
    num_hidden_layers=6, num_kv_shared_layers=2, head_dim=16, sliding_window=4, hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=VOCAB, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
)

# Hybrid models: stateful token mixers (Gated DeltaNet, Mamba 1/2, short convolutions) beside attention layers.
_LINEAR, _FULL = "linear_attention", "full_attention"
_GATED_DELTA_NET = dict(num_hidden_layers=4, head_dim=16, layer_types=[_LINEAR, _LINEAR, _FULL, _LINEAR],
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_conv_kernel_dim=4)
_MAMBA2 = dict(num_hidden_layers=4, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
               mamba_chunk_size=16)
HYBRID_ARCHITECTURES: dict[str, dict] = {
    "qwen3_5_text": _GATED_DELTA_NET,
    "qwen3_next": dict(_GATED_DELTA_NET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "olmo_hybrid": {k: v for k, v in dict(_GATED_DELTA_NET, linear_num_value_heads=2, linear_value_head_dim=32).items()
                    if k != "head_dim"},
    "granitemoehybrid": dict(_MAMBA2, layer_types=["mamba", "attention", "mamba", "mamba"], num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=64),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8),
    "bamba": dict(_MAMBA2, attn_layer_indices=[1]),
    # every layer runs a Mamba2 mixer and attention side by side: two breaks per layer
    "falcon_h1": dict(_MAMBA2, head_dim=16, mamba_d_ssm=128),
    "lfm2": dict(num_hidden_layers=4, layer_types=["conv", _FULL, "conv", "conv"], conv_L_cache=3),
    # Mamba2 layers, and hybrid layers: a shared attention block (its cache slot passed per call; tied weights) then
    # a Mamba2 mixer that receives the graph's position embeddings
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], n_mamba_heads=8,
                   mamba_d_state=16, mamba_ngroups=1, chunk_size=16, attention_head_dim=32, use_mem_rope=True),
    # Zamba (v1): Mamba layers and hybrid layers with a shared attention block (layer_idx None, slot per call)
    "zamba": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], n_mamba_heads=2,
                  mamba_d_state=16, attention_head_dim=16, mamba_dt_rank=8),
    # Mamba2, attention, Mamba2, then an MLP-only layer (no mask, no cache state)
    "nemotron_h": dict(num_hidden_layers=4, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                       n_groups=1, chunk_size=16, hybrid_override_pattern="M*M-"),
    # lightning attention: its state lives in a list of MiniMax's own cache class, replaced every step
    "minimax": dict(num_hidden_layers=4, head_dim=16, layer_types=[_FULL, _LINEAR, _FULL, _LINEAR], num_local_experts=4,
                    num_experts_per_tok=2, block_size=8),
}

# model_type -> config overrides. Sliding windows are small so they bite inside the test sequences.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=6),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(sliding_window=6),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(rotary_pct=0.5),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True),
    "olmo": {},
    "olmo2": {},
    "starcoder2": dict(sliding_window=6),
    # its config names a sliding window its stack never applies (plain causal masks): bcg must build the same
    "moshi": dict(sliding_window=6, head_dim=16),
    "granite": {},
    "cohere": {},
    "stablelm": {},
    "smollm3": {},
    "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_MOE, head_dim=16),
    "mixtral": dict(_MOE, sliding_window=None),
    "gpt_oss": dict(_MOE, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    # Layers 4 and 5 have no cache slot of their own: they read the keys/values layers 3 and 2 stored (KV sharing).
    "gemma4_text": dict(_GEMMA_KV_SHARING, global_head_dim=32),
    "gemma3n_text": dict(_GEMMA_KV_SHARING, laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 6),
    # Chunked attention on three layers of four (its get_decoder() returns the model: the stack is found by scanning).
    "llama4_text": dict(num_hidden_layers=4, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                        num_experts_per_tok=1, attention_chunk_size=4),
    **HYBRID_ARCHITECTURES,
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **ARCHITECTURES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.to(device).eval()


def left_padded_batch(batch: int = 3, seq: int = 9, pads: tuple[int, ...] = (3, 0, 5), device: str = "cpu",
                      seed: int = 1):
    """Token ids in [3, VOCAB) with a left-padding 2D mask (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads[:batch]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids.to(device), mask.to(device)

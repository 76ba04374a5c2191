"""Real CUDA graphs on a GPU: parity with eager, mixed bucket order, break count, a real model (SmolLM2).

Run on a CUDA machine with ``python -m pytest -m gpu tests/test_gpu.py``. SmolLM2 needs ``BCG_SMOLLM2_DIR``
pointing at the directory made by ``../shared/tools/get-smollm2.sh``.
"""

import gc
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import bcg
from bcg import hf
from bcg.backends import make_backend
import internals
from tiny_models import left_padded_batch, tiny_model

pytestmark = pytest.mark.gpu
# MoE models are tested in bf16 below: in fp32 the experts' grouped_mm fallback copies from the host and
# cannot be captured (those buckets fall back to eager, counted as capture_failed).
GPU_ARCHITECTURES = ["llama", "qwen3", "mistral", "gemma2", "gpt2", "opt", "phi3", "gemma3_text", "gemma4_text",
                     # hybrid: Gated DeltaNet, Mamba2 beside attention in every layer, short convolutions, Mamba2
                     "qwen3_5_text", "olmo_hybrid", "falcon_h1", "lfm2", "bamba", "nemotron_h", "zamba", "zamba2"]
# The hybrids without MoE (fp32 real graphs cannot capture the MoE ones' expert loops; they run in bf16 below).
FP32_HYBRIDS = ["qwen3_5_text", "olmo_hybrid", "falcon_h1", "lfm2", "bamba", "nemotron_h", "zamba", "zamba2"]
GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", GPU_ARCHITECTURES)
def test_real_graphs_match_eager_fp32(arch):
    model = tiny_model(arch, device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    reference_tokens = model.generate(ids, attention_mask=mask, **GENERATE)

    handle = bcg.wrap_model(model)
    assert handle.stats()["backend"] == "cuda"
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    stats = handle.stats()

    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)
    assert stats["replays"] == 1 + GENERATE["max_new_tokens"]  # forward + prefill + decode steps
    assert stats["rejects"] == {}
    assert stats["graph_bytes"] > 0

    bcg.unwrap_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)


def test_gemma3n_replays_or_falls_back_with_a_warning_where_its_code_cannot_be_captured():
    """transformers 5.17's Gemma 3n copies a CPU scalar to the GPU in its forward, which no CUDA graph can hold:
    that capture fails with one warning and the calls run eagerly; newer versions capture and replay."""
    model = tiny_model("gemma3n_text", device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    reference_tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    handle = bcg.wrap_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)
    stats = handle.stats()
    if stats["capture_failures"]:
        assert all("CPU and CUDA" in reason for reason in stats["capture_failures"].values())
        assert sum(issubclass(w.category, bcg.BcgCaptureWarning) for w in caught) == 1
    else:
        assert stats["replays"] == 1 + GENERATE["max_new_tokens"] and stats["rejects"] == {}


def test_segments_alternate_graph_and_break_once_per_layer():
    model = tiny_model("llama", device="cuda", num_hidden_layers=3)
    handle = bcg.wrap_model(model, capture_sizes=[8], max_num_tokens=8, lazy=False)
    graph = internals.breakable_graphs(handle)[("ids", 8)]._graph
    kinds = [type(s).__name__ for s in graph._segments]
    assert kinds == ["CUDAGraph", "_EagerSegment"] * 3 + ["CUDAGraph"]


def test_buckets_replayed_in_mixed_order_match_eager():
    reference = tiny_model("qwen3", device="cuda")
    model = tiny_model("qwen3", device="cuda")
    handle = bcg.wrap_model(model, capture_sizes=[1, 4, 16, 32, 64], max_num_tokens=64, lazy=False)
    generator = torch.Generator().manual_seed(5)
    for batch, seq in [(3, 10), (1, 3), (4, 16), (2, 5), (1, 1), (5, 10), (1, 16)]:
        ids = torch.randint(3, 128, (batch, seq), generator=generator).to("cuda")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert handle.stats()["replays"] == 7 and handle.stats()["rejects"] == {}


def test_one_wrapper_many_buckets_same_graphs_reused():
    model = tiny_model("llama", device="cuda")
    handle = bcg.wrap_model(model, capture_sizes=[4, 16, 64], max_num_tokens=64, lazy=False)
    ids = torch.randint(3, 128, (2, 7), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    assert handle.stats()["captured"] == [4, 16, 64] and handle.stats()["replays"] == 3


def _mgsm_questions(n: int) -> list[str]:
    default = Path(__file__).resolve().parents[1].parent / "shared/data/mgsm"
    path = Path(os.environ.get("BCG_MGSM_DIR", default)) / "mgsm_en_test.jsonl"
    return [json.loads(line)["question"] for line in path.read_text().splitlines()[:n]]


@pytest.mark.skipif(not os.environ.get("BCG_SMOLLM2_DIR"), reason="set BCG_SMOLLM2_DIR (get-smollm2.sh)")
def test_smollm2_batched_mgsm_generation_matches_eager():
    """A real model in bf16: mode="exact" gives eager's text; the default mode computes an unpadded prompt exactly as
    mode="exact", a padded one per request (varlen attention: rounding-level), and decode steps with fast attention
    and fused kernels.

    Greedy bf16 text from fast decode steps drifts from eager's the way eager drifts from itself under another
    attention kernel or batch composition (scripts/agreement_probe.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = os.environ["BCG_SMOLLM2_DIR"], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.bfloat16).cuda().eval()
    prompts = [f"Question: {q}\nAnswer: Let's think step by step." for q in _mgsm_questions(8)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def texts() -> list[str]:
        return tokenizer.batch_decode(model.generate(**batch, **kwargs), skip_special_tokens=True)

    def last_logits() -> torch.Tensor:
        with torch.no_grad():
            unpadded = model(input_ids=batch["input_ids"][:1, -batch["attention_mask"][0].sum():]).logits[:, -1]
            return torch.cat([model(**batch).logits[:, -1], unpadded]).float()

    eager, eager_logits = texts(), last_logits()
    bcg.wrap_model(model, mode="exact")
    exact, exact_logits = texts(), last_logits()
    bcg.unwrap_model(model)
    handle = bcg.wrap_model(model)
    fast, fast_logits = texts(), last_logits()

    assert handle.stats()["rejects"] == {}
    assert sum(a == b for a, b in zip(exact, eager)) >= 7
    assert torch.equal(fast_logits[-1], exact_logits[-1])  # an unpadded prompt: the same kernels in both modes
    assert (fast_logits.argmax(-1) == exact_logits.argmax(-1)).sum() >= 8
    # Llama: an input and a post-attention norm per layer, and the final one; an MLP and a residual add per layer
    layers = model.config.num_hidden_layers
    assert handle.stats()["fused_kernels"] == {"rms_norm": 2 * layers + 1, "rotary": 1, "swiglu": layers,
                                               "add_rms_norm": layers, "qk_norm_rotary": 0, "cache_write": layers,
                                               "qkv_gemm": layers, "gate_up_gemm": layers, "unmatched": []}
    assert (fast_logits.argmax(-1) == eager_logits.argmax(-1)).sum() >= 7
    print(f"default mode: {sum(a == b for a, b in zip(fast, eager))}/8 texts identical to eager")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "llama4_text",
                                  # hybrids with MoE layers: their mixers as breaks beside grouped_mm experts
                                  "qwen3_next", "granitemoehybrid", "jamba", "minimax"])
def test_moe_bf16_graphs_match_eager(arch):
    """MoE experts run transformers' grouped_mm kernels (bf16 on Hopper) inside the graphs."""
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits.float()
    reference_tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    handle = bcg.wrap_model(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    real = mask.bool()
    assert (logits[real] - reference[real]).abs().max() < 5e-2 * reference[real].abs().max()
    assert (logits[real].argmax(-1) == reference[real].argmax(-1)).float().mean() >= 0.9
    assert (tokens == reference_tokens).float().mean() >= 0.9
    assert handle.stats()["rejects"] == {} and handle.stats()["replays"] == 1 + GENERATE["max_new_tokens"]


def test_merging_the_projections_leaves_no_originals_reserved():
    """Wrapping (fast mode) merges q/k/v and gate/up into new tensors; their originals' segments go back to the device,
    so the allocator reserves no more than before (without: as much again as the merged weights, 152 MiB here)."""
    model = tiny_model("llama", device="cuda", num_hidden_layers=2, hidden_size=1024, intermediate_size=8192,
                       num_attention_heads=8)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    handle = bcg.wrap_model(model)
    assert handle.stats()["fused_kernels"]["gate_up_gemm"] == 2
    assert torch.cuda.memory_reserved() - before <= 48 * 2**20  # what the wrap's probe run may reserve


def test_capture_out_of_memory_falls_back_to_eager():
    """A real CUDA OOM while capturing the large bucket: one warning, the reason in stats, small buckets still work."""
    shape = dict(hidden_size=512, intermediate_size=8192, num_attention_heads=8)
    reference = tiny_model("llama", device="cuda", **shape)
    model = tiny_model("llama", device="cuda", **shape)
    ids = torch.randint(3, 128, (2, 3), device="cuda")
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()  # earlier tests' wrapped models are reference cycles: free them before measuring
    torch.cuda.empty_cache()
    # 64 MiB of room: enough for 8 tokens, not for the activations of 4096 (each MLP tensor alone is 128 MiB).
    # The fraction caps *reserved* memory, so the room is counted from what the allocator already holds.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 64 * 2**20) / total)
    try:
        with pytest.warns(bcg.BcgCaptureWarning, match="OutOfMemoryError"):
            handle = bcg.wrap_model(model, capture_sizes=[8, 4096], max_num_tokens=4096, lazy=False)
        with torch.no_grad():
            got = model(ids, use_cache=False).logits
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    stats = handle.stats()
    assert stats["captured"] == [8] and "ids:4096" in stats["capture_failures"] and stats["replays"] == 1


def test_cast_on_gpu_invalidates_and_recaptures():
    reference = tiny_model("qwen3", device="cuda")
    model = tiny_model("qwen3", device="cuda")
    handle = bcg.wrap_model(model)
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model.half()
        reference.half()
        with pytest.warns(bcg.BcgInvalidatedWarning):
            got = model(ids, attention_mask=mask).logits.float()
        expected = reference(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-2
    assert handle.stats()["invalidations"] == 1 and handle.stats()["replays"] == 2


def test_inference_mode_and_autocast_on_real_graphs():
    """Buffers made under inference mode stay usable; each autocast state replays a graph captured under it."""
    reference = tiny_model("qwen3", device="cuda")
    model = tiny_model("qwen3", device="cuda")
    handle = bcg.wrap_model(model)
    ids, mask = left_padded_batch(device="cuda")
    real = mask.bool()
    with torch.inference_mode():
        first = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        plain = model(ids, attention_mask=mask).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast, expected_autocast = (m(ids, attention_mask=mask).logits.float() for m in (model, reference))
        again = model(ids, attention_mask=mask).logits
    for got in (first, plain, again):
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (autocast[real] - expected_autocast[real]).abs().max() < 2e-2 * expected_autocast[real].abs().max()
    assert (autocast[real] - expected[real]).abs().max() > 0  # it really ran in bf16
    stats = handle.stats()
    assert stats["replays"] == 4 and stats["rejects"] == {}
    # 19 real tokens, packed; a padded prompt in the default mode replays the fused (/fast) graphs
    assert stats["captured_graphs"] == ["ids/fast:24", "ids@autocast-bfloat16/fast:24"]


def test_deepcopy_of_a_captured_model_is_unwrapped_and_right():
    import copy

    model = tiny_model("llama", device="cuda")
    handle = bcg.wrap_model(model)
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    assert handle.stats()["replays"] == 1 and getattr(clone, "_bcg_handle", None) is None


def test_randomized_parity_real_graphs():
    """The CPU hypothesis test's space, on real graphs (a fixed sample: capture per example is the slow part)."""
    generator = torch.Generator().manual_seed(11)
    reference = tiny_model("gemma3_text", device="cuda")
    model = tiny_model("gemma3_text", device="cuda")
    handle = bcg.wrap_model(model, capture_sizes=[1, 2, 4, 8, 16, 32, 48, 64], max_num_tokens=64)
    for _ in range(20):
        batch = int(torch.randint(1, 5, (1,), generator=generator))
        seq = int(torch.randint(1, 13, (1,), generator=generator))
        ids = torch.randint(3, 128, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        pads = torch.randint(0, seq, (batch,), generator=generator)
        for row, pad in enumerate(pads.tolist()):
            ids[row, :pad], mask[row, :pad] = 0, 0
        ids, mask = ids.cuda(), mask.cuda()
        with torch.no_grad():
            got, expected = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
        kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert set(handle.stats()["rejects"]) <= {"padding_waste"}


def _rotary_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q and k as attention layers hand them over ([B, H, S, D] views of token-major memory), real cos/sin."""
    generator = torch.Generator(device="cuda").manual_seed(3)
    batch, seq, heads, kv_heads, dim = 3, 37, 32, 8, 128
    q = torch.randn(batch, seq, heads, dim, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    angles = torch.rand(batch, seq, dim // 2, device="cuda", generator=generator) * 4096
    emb = torch.cat((angles, angles), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_rotary_kernel_is_bit_identical_to_llamas_code(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from bcg.kernels import rotary

    q, k, cos, sin = _rotary_inputs(dtype)
    for c, s in ((cos, sin), (cos[:1], sin[:1])):  # per-row positions, and one set broadcast over the batch
        for got, expected in zip(rotary(q, k, c, s), apply_rotary_pos_emb(q, k, c, s)):  # q and k in one launch
            assert torch.equal(got, expected) and got.stride() == expected.stride()


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11), (torch.float32, 2**-23)])
def test_fused_qk_norm_rotary_kernel_matches_qwen3s_code_to_rounding(dtype, ulp):
    """Qwen3's attention: q_norm / k_norm per head (Llama's RMSNorm, fp32 inside, rounded to the dtype before the
    weight's product), then the rotary embedding in the dtype. The norm differs from eager's only by the order of its
    fp32 sum of squares (as the fused RMSNorm's), the rotation adds no difference of its own: each element is within
    a few rounding steps of the products it sums (|x1 cos| + |x2 sin|, a sum near zero keeps no more digits), in 16-bit
    types almost all bit-identical."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    from bcg.kernels import rotary

    q, k, cos, sin = _rotary_inputs(dtype)
    q, k = q * 3, k * 3  # the projections' scale, not the norm's
    generator = torch.Generator(device="cuda").manual_seed(7)
    norms = [Qwen3RMSNorm(q.shape[-1], eps=1e-6).to("cuda", dtype) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.randn(q.shape[-1], device="cuda", generator=generator) * 0.2 + 1)
        normed = [norm(x.transpose(1, 2)).transpose(1, 2) for norm, x in zip(norms, (q, k))]
    weights = tuple((norm.weight, norm.variance_epsilon) for norm in norms)
    for c, s in ((cos, sin), (cos[:1], sin[:1])):
        expected = apply_rotary_pos_emb(*normed, c, s)
        for got, want, x in zip(rotary(q, k, c, s, norms=weights), expected, normed):
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
            half = x.shape[-1] // 2
            swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1).float().abs()
            scale = x.float().abs() * c.float().abs().unsqueeze(1) + swapped * s.float().abs().unsqueeze(1)
            assert ((got.float() - want.float()).abs() <= 8 * ulp * scale + 1e-30).all()
            if dtype != torch.float32:
                assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_cache_write_kernel_is_index_copy_at_the_length_also_in_a_graph(dtype):
    """Keys and values written where a StaticLayer's two index_copy_ write them, bit for bit: caches as a stand-in's
    (slices of one tensor per kind), the step's keys in the rotary's layout and values of another head dim as the
    projection's view; the position read from the length counter on the device, so a graph captured at one length
    writes at the next step's."""
    from bcg.kernels import write_cache

    generator = torch.Generator(device="cuda").manual_seed(8)
    batch, heads, length, k_dim, v_dim = 3, 8, 40, 128, 64
    stacked_keys = torch.randn(2, batch, heads, length, k_dim, device="cuda", generator=generator).to(dtype)
    stacked_values = torch.randn(2, batch, heads, length, v_dim, device="cuda", generator=generator).to(dtype)
    keys, values = stacked_keys[1], stacked_values[1]
    other_layer = stacked_keys[0].clone(), stacked_values[0].clone()
    new_keys = torch.randn(batch, 1, heads, k_dim, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    new_values = torch.randn(batch, 1, heads * v_dim, device="cuda", generator=generator).to(dtype)
    new_values = new_values.view(batch, 1, heads, v_dim).transpose(1, 2)
    counter = torch.tensor(5, device="cuda")
    expected_keys, expected_values = keys.clone(), values.clone()
    graph = torch.cuda.CUDAGraph()
    write_cache(keys, values, new_keys, new_values, counter)  # compiles the kernel outside the capture
    with torch.cuda.graph(graph):
        write_cache(keys, values, new_keys, new_values, counter)
    for position in (5, 17, length - 1, length):  # the last is past the end: nothing written (index_copy_ faults)
        counter.fill_(position)
        graph.replay()
        if position < length:
            index = torch.tensor([position], device="cuda")
            expected_keys.index_copy_(2, index, new_keys)
            expected_values.index_copy_(2, index, new_values)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(stacked_keys[0], other_layer[0]) and torch.equal(stacked_values[0], other_layer[1])


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11), (torch.float32, 2**-23)])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 37, 1024), (4, 16, 8, 128), (5, 896)])
def test_fused_rms_norm_kernel_matches_llamas_code_to_rounding(dtype, ulp, shape):
    """Only the order of the fp32 sum of squares differs: results agree to a rounding step; in 16-bit types, where
    the final rounding absorbs it, almost all exactly."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from bcg.kernels import rms_norm

    generator = torch.Generator(device="cuda").manual_seed(4)
    norm = LlamaRMSNorm(shape[-1], eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], device="cuda", generator=generator) * 0.2 + 1)
        x = (torch.randn(shape, device="cuda", generator=generator) * 3).to(dtype)
        expected = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    difference = (got.float() - expected.float()).abs()
    assert (difference <= 4 * ulp * expected.float().abs() + 1e-30).all()
    if dtype != torch.float32:
        assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 8960), (3, 37, 1000)])
@pytest.mark.parametrize("merged", [False, True])
def test_fused_swiglu_kernel_is_bit_identical_to_llamas_code_but_for_denormals(dtype, shape, merged):
    """silu rounded to the dtype, then the product: eager's two kernels, also where exp over- or underflows. Triton
    flushes a product that is denormal in fp32 to zero where torch keeps it (silu(-88) x a small up: ~1e-39 in bf16 /
    fp32), as the rotary kernel does; every other element is bit-identical (fp16 keeps its own denormals: they are
    normal in fp32). ``merged``: gate and up are the two halves of one ``[..., 2I]`` tensor (a merged gate/up GEMM's
    output), read at its row stride."""
    from transformers.activations import ACT2FN

    from bcg.kernels import silu_mul

    generator = torch.Generator(device="cuda").manual_seed(5)
    gate = torch.randn(shape, device="cuda", generator=generator) * 4
    gate[..., :6] = torch.tensor([-100.0, 100.0, -88.0, 88.0, 0.0, -0.0])
    gate = gate.to(dtype)
    up = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    if merged:
        gate, up = torch.cat([gate, up], dim=-1).split(shape[-1], dim=-1)
    got, want = silu_mul(gate, up), ACT2FN["silu"](gate) * up
    denormal = (want != 0) & (want.float().abs() < torch.finfo(torch.float32).tiny)  # fp32's, where the kernel works
    assert torch.equal(got, torch.where(denormal, torch.zeros_like(want), want))


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11), (torch.float32, 2**-23)])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 37, 1024), (5, 896)])
def test_fused_add_rms_norm_kernel_matches_llamas_code_to_rounding(dtype, ulp, shape):
    """The residual add is eager's (bit-identical, in the dtype); the norm of it as the fused RMSNorm's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from bcg.kernels import add_rms_norm

    generator = torch.Generator(device="cuda").manual_seed(6)
    norm = LlamaRMSNorm(shape[-1], eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], device="cuda", generator=generator) * 0.2 + 1)
        hidden = torch.randn(shape, device="cuda", generator=generator).to(dtype)
        residual = (torch.randn(shape, device="cuda", generator=generator) * 3).to(dtype)
        expected_sum = residual + hidden
        expected = norm(expected_sum)
    got, got_sum = add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    assert torch.equal(got_sum, expected_sum)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    difference = (got.float() - expected.float()).abs()
    assert (difference <= 4 * ulp * expected.float().abs() + 1e-30).all()
    if dtype != torch.float32:
        assert (got != expected).float().mean() < 0.01


def _kernel_launches(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """CUDA kernels of one replayed decode step (one token per sequence on a cache: where the default mode fuses)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    name = hf.cache_argument(model.forward)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = {"input_ids": ids[:, -1:], "use_cache": True, name: out[name]}
        model(**step)  # captures, if this shape has not been yet
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**step)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def test_default_mode_leaves_log_likelihoods_bitwise_exact_modes():
    """bf16, real graphs: lm-eval's right-padded mask-free batch gives exactly mode="exact"'s logits in the default
    mode; a left-padded prompt attends per request (torch's varlen flash kernel: rounding-level from the padded
    SDPA); decode steps replay their own fused graphs."""
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
    ids, mask = left_padded_batch(device="cuda")

    def prompt_logits() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids).logits

    bcg.wrap_model(model, mode="exact")
    exact = prompt_logits()
    bcg.unwrap_model(model)
    handle = bcg.wrap_model(model)
    fast = prompt_logits()
    model.generate(ids, attention_mask=mask, **GENERATE)

    assert torch.equal(fast[1], exact[1])
    real = mask.bool()
    torch.testing.assert_close(fast[0][real], exact[0][real], atol=5e-2, rtol=0)
    stats = handle.stats()
    assert stats["fused_kernels"]["rms_norm"] > 0 and stats["rejects"] == {}
    assert any(graph.startswith("ids/fast:") for graph in stats["captured_graphs"]), stats["captured_graphs"]


def test_default_mode_fuses_kernels_replays_fewer_and_matches_eager():
    reference = tiny_model("qwen3", device="cuda")
    plain = tiny_model("qwen3", device="cuda")
    model = tiny_model("qwen3", device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    expected_tokens = reference.generate(ids, attention_mask=mask, **GENERATE)

    bcg.wrap_model(plain, mode="exact")
    handle = bcg.wrap_model(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        plain(input_ids=ids, attention_mask=mask)
    tokens = model.generate(ids, attention_mask=mask, **GENERATE)

    layers = model.config.num_hidden_layers
    assert handle.stats()["fused_kernels"] == {"rms_norm": 4 * layers + 1, "rotary": 1, "swiglu": layers,
                                               "add_rms_norm": layers, "qk_norm_rotary": layers,
                                               "cache_write": layers, "qkv_gemm": layers, "gate_up_gemm": layers,
                                               "unmatched": []}
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)  # fp32: rounding-level
    assert torch.equal(tokens, expected_tokens)
    assert handle.stats()["rejects"] == {} and handle.stats()["replays"] == 1 + GENERATE["max_new_tokens"]
    # per layer, 4 norms of 6 kernels (fp32: the casts are no-ops) and a rotary call of 10 become 6 launches (the
    # SwiGLU and residual add fusions cut two more: test_default_mode_fuses_swiglu_and_the_residual_add...)
    assert _kernel_launches(model, ids) <= _kernel_launches(plain, ids) - 24 * layers


def _fused_and_without(arch: str, monkeypatch, merged: bool = True, **unfused):
    """A model wrapped with the default fusions and its greedy tokens beside eager's, and a twin wrapped without the
    fusions ``unfused`` empties (find_fusions' fields) and, with ``merged=False``, with its q/k/v and gate/up
    projections left unmerged: (handle, model, twin, ids, tokens, eager's tokens)."""
    from dataclasses import replace

    from bcg.fusion import find_fusions

    reference, model, without = (tiny_model(arch, device="cuda") for _ in range(3))
    ids, mask = left_padded_batch(device="cuda")
    expected = reference.generate(ids, attention_mask=mask, **GENERATE)
    handle = bcg.wrap_model(model)
    tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    monkeypatch.setattr("bcg.wrap.find_fusions", lambda stack: replace(find_fusions(stack), **unfused))
    if not merged:
        monkeypatch.setattr("bcg.fusion.Fusions.merge_projections", lambda self, model: None)
    bcg.wrap_model(without)
    return handle, model, without, ids, tokens, expected


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_default_mode_fuses_swiglu_and_the_residual_add_and_decodes_as_eager(arch, monkeypatch):
    """fp32: greedy tokens equal eager's, and each layer's SwiGLU and post-attention add + norm replay one kernel
    each fewer than a model fused as before (norms and rotary alone)."""
    handle, model, norms_and_rotary_only, ids, tokens, expected = _fused_and_without(arch, monkeypatch, mlps=[],
                                                                                      layers=[])
    layers = model.config.num_hidden_layers
    fused = handle.stats()["fused_kernels"]
    assert fused["swiglu"] == layers and fused["add_rms_norm"] == layers and fused["unmatched"] == []
    assert torch.equal(tokens, expected)
    assert handle.stats()["rejects"] == {}
    assert _kernel_launches(model, ids) <= _kernel_launches(norms_and_rotary_only, ids) - 2 * layers


@pytest.mark.parametrize("arch, unfused, saved_per_layer", [
    ("qwen3", dict(attentions=[]), 2),  # q norm, k norm, the rotary of q and k: 3 launches -> 1
    ("qwen3", dict(cache_layers=0), 3),  # positions, their offset, the counter's advance, 2 index_copy_: 5 -> 2
    ("llama", dict(cache_layers=0), 3),
])
def test_default_mode_fuses_qk_norms_with_rotary_and_the_cache_write(arch, unfused, saved_per_layer, monkeypatch):
    """fp32: greedy tokens equal eager's, and a decode step on the stand-in replays ``saved_per_layer`` launches fewer
    per layer than one without that fusion (Qwen3's q/k norms inside the rotary kernel; the cache write)."""
    handle, model, without, ids, tokens, expected = _fused_and_without(arch, monkeypatch, **unfused)
    layers = model.config.num_hidden_layers
    fused = handle.stats()["fused_kernels"]
    assert fused["qk_norm_rotary"] == (layers if arch == "qwen3" else 0) and fused["cache_write"] == layers
    assert handle.stats()["rejects"] == {} and handle.stats()["full_graph_replays"] > 0
    assert torch.equal(tokens, expected)
    assert _kernel_launches(model, ids) <= _kernel_launches(without, ids) - saved_per_layer * layers


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_default_mode_runs_qkv_and_gate_up_as_one_gemm_each_and_decodes_as_eager(arch, monkeypatch):
    """fp32: greedy tokens equal eager's, and a decode step replays 3 launches fewer per layer than a twin whose
    projections stay unmerged (q, k and v: 3 GEMMs -> 1; gate and up: 2 -> 1)."""
    handle, model, unmerged, ids, tokens, expected = _fused_and_without(arch, monkeypatch, merged=False)
    layers = model.config.num_hidden_layers
    fused, twin = handle.stats()["fused_kernels"], unmerged._bcg_handle.stats()["fused_kernels"]
    assert fused["qkv_gemm"] == fused["gate_up_gemm"] == layers
    assert twin["qkv_gemm"] == twin["gate_up_gemm"] == 0 and twin["swiglu"] == layers
    assert torch.equal(tokens, expected)
    assert handle.stats()["rejects"] == {} and handle.stats()["full_graph_replays"] > 0
    assert _kernel_launches(model, ids) <= _kernel_launches(unmerged, ids) - 3 * layers


def _prompt_and_step_logits(model: torch.nn.Module, ids: torch.Tensor,
                            mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of a left-padded prompt (all but the last token) and of one decode step on its cache."""
    name = hf.cache_argument(model.forward)
    with torch.no_grad():
        prompt = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{name: prompt[name]})
    return prompt.logits, step.logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_merged_projections_match_unmerged_ones_in_bf16(arch, monkeypatch):
    """bf16, real graphs: a model whose q/k/v and gate/up run as one GEMM each (the default) against a twin wrapped
    with them unmerged: a padded prompt's and a decode step's logits agree to bf16 rounding; an unpadded prompt (eager's
    kernels, on the merged weights' row blocks) and the projections called outside bcg are bit-identical; unwrap gives
    each weight storage of its own again, computing eager's logits as before."""
    model, twin = (tiny_model(arch, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    ids, mask = left_padded_batch(device="cuda")
    unpadded = ids[1:2]  # the second row has no padding
    with torch.no_grad():
        eager = model(input_ids=unpadded).logits
    handle = bcg.wrap_model(model)
    monkeypatch.setattr("bcg.fusion.Fusions.merge_projections", lambda self, model: None)
    twin_handle = bcg.wrap_model(twin)
    layers = model.config.num_hidden_layers
    fused, unmerged = handle.stats()["fused_kernels"], twin_handle.stats()["fused_kernels"]
    assert fused["qkv_gemm"] == fused["gate_up_gemm"] == layers
    assert unmerged["qkv_gemm"] == unmerged["gate_up_gemm"] == 0

    (prompt, step), (twin_prompt, twin_step) = (_prompt_and_step_logits(m, ids, mask) for m in (model, twin))
    real = mask[:, :-1].bool()
    torch.testing.assert_close(prompt[real], twin_prompt[real], atol=2e-2, rtol=0)  # logits up to ~0.6
    torch.testing.assert_close(step, twin_step, atol=2e-2, rtol=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=unpadded).logits, twin(input_ids=unpadded).logits)
        x = torch.randn(3, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        for layer, twin_layer in zip(model.model.layers, twin.model.layers):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                assert torch.equal(layer.get_submodule(name)(x), twin_layer.get_submodule(name)(x)), name
    for h in (handle, twin_handle):
        assert h.stats()["rejects"] == {} and h.stats()["full_graph_replays"] > 0
    bcg.unwrap_model(model)
    assert all(p.untyped_storage().nbytes() == p.nbytes for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=unpadded).logits, eager)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_static_cache_decode_is_one_graph_per_step(arch):
    """fp32, real graphs: each decode step on a StaticCache replays one graph with no breaks, equal to eager, and a
    second generate() (a new cache of the same shape) replays the same graph."""
    from test_decode import GENERATE as STATIC_GENERATE, STEPS, _assert_same_cache, _cache_of

    reference = tiny_model(arch, device="cuda")
    model = tiny_model(arch, device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    kwargs = dict(attention_mask=mask, cache_implementation="static", **STATIC_GENERATE)
    expected = reference.generate(ids, disable_compile=True, **kwargs)  # eager, not HF's compiled decode
    handle = bcg.wrap_model(model)
    first, second = model.generate(ids, **kwargs), model.generate(ids, **kwargs)
    for got in (first, second):
        assert torch.equal(got.sequences, expected.sequences)
        _assert_same_cache(_cache_of(got), _cache_of(expected))
    stats = handle.stats()
    assert stats["full_graph_replays"] == 2 * STEPS and stats["rejects"] == {}
    (entry,) = internals.full_decoder(handle).graphs.values()
    assert [type(s).__name__ for s in entry.graph._graph._segments] == ["CUDAGraph"]


# gpt_oss is left out: its fp32 experts (grouped_mm) copy from host memory on CUDA, which no capture allows (README).
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_static_caches_decode_as_full_graphs_on_real_graphs(arch):
    """fp32, real graphs: sliding layers short of full decode as one graph per step, building their masks inside the
    graph from the padding mask; tokens, cache and lengths (Python-side ones too) equal eager's. The cache (11
    positions, 9 prompt tokens) is nearly full when the graph is captured: its warm-ups must not write past the end.
    The prompt runs before wrapping."""
    from test_decode import _assert_same_cache, decode_after_an_eager_prefill

    ids, mask = left_padded_batch(device="cuda")
    runs = [decode_after_an_eager_prefill(tiny_model(arch, device="cuda", sliding_window=64), ids, mask, wrap=wrap,
                                          steps=2, max_cache_len=11) for wrap in (None, bcg.wrap_model)]
    (expected, expected_cache, _), (got, got_cache, handle) = runs
    assert torch.equal(got, expected)
    _assert_same_cache(got_cache, expected_cache)
    assert handle.stats()["full_graph_replays"] == 2 and handle.stats()["rejects"] == {}


def test_sliding_window_static_cache_generate_on_real_graphs():
    """generate(cache_implementation="static") on a wrapped sliding-window model equals eager's, for three lengths in
    turn (a new cache of another size each time, the prompt's graphs replayed). The reference is not compiled: HF's
    compiled generate() is no reference here (on the H200, with CUDA graph trees off, it trips an inductor index
    assert by itself; with them on, a later graph of the process hit an illegal address)."""
    from test_decode import GENERATE

    reference = tiny_model("mistral", device="cuda", sliding_window=64)
    model = tiny_model("mistral", device="cuda", sliding_window=64)
    ids, mask = left_padded_batch(device="cuda")
    handle = bcg.wrap_model(model)
    lengths = (6, 2, 4)
    for new_tokens in lengths:
        kwargs = dict(GENERATE, attention_mask=mask, cache_implementation="static", max_new_tokens=new_tokens)
        expected = reference.generate(ids, disable_compile=True, **kwargs).sequences
        assert torch.equal(model.generate(ids, **kwargs).sequences, expected)
    # every token after a call's first is a decode step, one graph each (the window of 64 never fills)
    assert handle.stats()["full_graph_replays"] == sum(n - 1 for n in lengths) and handle.stats()["rejects"] == {}


def test_two_live_static_caches_on_real_graphs():
    """Graphs read bcg's cache tensors by address: caches decoded in turn rebind them and get their own back."""
    from test_decode import decode_two_caches

    reference = tiny_model("qwen3", device="cuda")
    model = tiny_model("qwen3", device="cuda")
    handle = bcg.wrap_model(model)
    prompts = [left_padded_batch(seed=1, device="cuda"), left_padded_batch(seed=2, device="cuda")]
    expected, expected_caches = decode_two_caches(reference, prompts)
    got, got_caches = decode_two_caches(model, prompts)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    for e, g in zip(expected_caches, got_caches):
        for a, b in zip(g.layers, e.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
    assert handle.stats()["full_graph_replays"] == 6


@pytest.mark.parametrize("arch", FP32_HYBRIDS)
def test_hybrid_steps_and_mixer_state_equal_eager_on_real_graphs(arch):
    """fp32: prefill and a 2-token continuation replay with the mixers as breaks, decode steps with the mixers inside
    the graph; every step's logits and every cache tensor (keys/values, convolution and recurrent states) match
    eager's."""
    from test_hybrid import STEPS, _cache_tensors, _steps

    reference = tiny_model(arch, device="cuda")
    model = tiny_model(arch, device="cuda")
    ids, mask = left_padded_batch(device="cuda")
    expected_logits, expected_cache, final_mask = _steps(reference, ids, mask)
    handle = bcg.wrap_model(model)
    logits, cache, _ = _steps(model, ids, mask)

    stats = handle.stats()
    assert stats["rejects"] == {} and stats["replays"] == STEPS + 2 and stats["graph_bytes"] > 0
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(_cache_tensors(cache, final_mask), _cache_tensors(expected_cache, final_mask), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert any("/mixers" in graph for graph in stats["captured_graphs"]), stats["captured_graphs"]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_static_cache_option_decodes_dynamic_caches_on_real_graphs(arch):
    """fp32, static_cache=True: generate()'s DynamicCache decodes through bcg's static stand-in, one graph per step;
    tokens and the cache left behind equal eager's; a second generate() replays the same graph."""
    from test_decode import check_stand_in_decode

    check_stand_in_decode(arch, device="cuda")


def test_kept_storages_are_bounded_and_dropped_graphs_freed_on_real_graphs():
    """fp32: mixer states for batch sizes 3, 2, 1, 3 with room for two, and static caches of three lengths with room
    for two: the least recently used storage goes with its graphs, every step equal to eager's."""
    from test_decode import check_static_storages_bounded
    from test_hybrid import check_mixer_storages_bounded

    check_mixer_storages_bounded(device="cuda")
    check_static_storages_bounded(device="cuda", mode="exact")


@pytest.mark.parametrize("arch", ["qwen3_5_text", "bamba", "lfm2"])
def test_two_caches_decoding_in_turn_on_real_graphs(arch):
    """fp32: a decode graph reads the mixer states at bcg's addresses; two caches decoding in turn each get their own
    states bound in and given back, equal to eager's."""
    from test_hybrid import check_two_caches_decoding_in_turn

    check_two_caches_decoding_in_turn(arch, device="cuda")


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])  # full attention; every layer a sliding window
def test_packed_prompts_run_torchs_varlen_kernel_on_real_graphs(arch, monkeypatch):
    """bf16, real graphs: a left-padded prompt's attention breaks run torch's flash varlen kernel per request (with
    the mask's window), within rounding of eager; generate() after it replays with no rejects."""
    from bcg import varlen
    kernel = varlen._flash_varlen()
    assert kernel is not None, "no varlen_attn with scale and window_size (torch 2.10+): one SDPA per request instead"
    launches, call = [], type(kernel).__call__
    monkeypatch.setattr(type(kernel), "__call__", lambda self, *a: launches.append(a[5]) or call(self, *a))
    reference = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    ids, mask = left_padded_batch(batch=4, seq=12, pads=(9, 0, 4, 2), device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    handle = bcg.wrap_model(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=5e-2, rtol=0)
    assert launches == [getattr(model.config, "sliding_window", None) if arch == "mistral" else None] * len(
        model.model.layers)
    model.generate(ids, attention_mask=mask, **GENERATE)
    assert handle.stats()["rejects"] == {}



@pytest.mark.parametrize("arch", FP32_HYBRIDS + ["llama"])
def test_second_turn_and_continuations_equal_eager_on_real_graphs(arch):
    """A second generate() turn on the returned cache and k-token forward calls on a past (tests/test_continuation.py)
    on real graphs: 5.25 made this path wrong for the Gated DeltaNet hybrids without a word."""
    from test_continuation import check_continuations

    handle = check_continuations(tiny_model(arch, device="cuda"), tiny_model(arch, device="cuda"), device="cuda")
    assert handle.stats()["backend"] == "cuda" and handle.stats()["rejects"] == {}, handle.stats()


@pytest.mark.parametrize("arch", ["llama", "qwen3_5_text", "mistral"])
def test_verification_passes_every_kind_on_real_graphs(arch):
    """verify=True on real graphs: each kind (prompt, decode, continuation; per path) checked against eager, none
    failed, and later calls replay."""
    from test_continuation import check_continuations

    handle = check_continuations(tiny_model(arch, device="cuda"), tiny_model(arch, device="cuda"), device="cuda",
                                 verify=True)
    verified = handle.stats()["verify"]
    assert verified["failed"] == {} and len(verified["checked"]) >= 3, verified
    assert handle.stats()["replays"] > len(verified["checked"])


@pytest.mark.parametrize("model_type", ["minicpm3", "deepseek_v3"])
def test_latent_attention_on_real_graphs(model_type):
    """Multi-head latent attention modules as breaks of their own on real graphs (fp32; the sweep's DeepSeek-V3 config
    has dense layers only: fp32 MoE experts cannot be captured): eager's tokens and logits over a second turn and
    k-token continuations, decode steps as one graph on a stand-in."""
    from test_continuation import check_continuations
    from test_latent_attention import _pair

    reference, model = (m.to("cuda") for m in _pair(model_type))
    dense = getattr(model.config, "first_k_dense_replace", 0) >= model.config.num_hidden_layers
    assert dense or model_type == "minicpm3"
    handle = check_continuations(reference, model, device="cuda")
    stats = handle.stats()
    assert stats["backend"] == "cuda" and stats["rejects"] == {} and stats["full_graph_replays"] > 0, stats


def _indexed_pair_on_cuda(model_type: str, **fields):
    """Two equal tiny indexed-attention models on the GPU (fp32, dense MLPs: fp32 MoE experts cannot be captured;
    GLM-MoE-DSA and HY-V4 with layers reusing the selection of the layer before, which keep no indexer keys)."""
    from test_latent_attention import _pair

    fields = dict(mlp_layer_types=["dense"] * 4, **fields)
    if model_type in ("glm_moe_dsa", "hy_v4"):
        fields["indexer_types"] = ["full", "shared", "full", "shared"]
    return [m.to("cuda") for m in _pair(model_type, **fields)]


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2"])
def test_sparse_attention_on_real_graphs(model_type):
    """Indexed attention modules, their indexers inside (keeping 4 past tokens: the selection bites), as breaks of
    their own on real graphs: eager's tokens and logits over a second turn and k-token continuations, decode steps
    through the breaks (``static_cache=False``: a stand-in's steps compute a static cache's, which breaks exact ties
    among index scores otherwise than eager's dynamic cache)."""
    from test_continuation import check_continuations
    from test_sparse_attention import BITING

    reference, model = _indexed_pair_on_cuda(model_type, **BITING)
    handle = check_continuations(reference, model, device="cuda", static_cache=False)
    stats = handle.stats()
    assert stats["backend"] == "cuda" and stats["rejects"] == {} and stats["replays"] >= 12, stats


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_decodes_on_a_stand_in_on_real_graphs(model_type):
    """The default mode's decode steps on a DynamicCache of indexed attention, one real graph each on bcg's static
    stand-in (keys, values, indexer keys, both length counters; indexer inside the graph), every key in use selected
    (``EVERY_KEY``): eager's tokens and logits over a second turn and k-token continuations. Nine stand-in steps (three
    per generate() turn, three plain decode calls), each graph a single CUDA graph, no breaks."""
    from test_continuation import check_continuations
    from test_sparse_attention import EVERY_KEY

    reference, model = _indexed_pair_on_cuda(model_type, **EVERY_KEY)
    handle = check_continuations(reference, model, device="cuda")
    stats = handle.stats()
    assert stats["backend"] == "cuda" and stats["rejects"] == {} and stats["capture_failures"] == {}, stats
    assert stats["full_graph_replays"] == 9, stats
    graphs = internals.stand_in_decoder(handle).graphs.values()
    assert graphs and all([type(s).__name__ for s in entry.graph._graph._segments] == ["CUDAGraph"] for entry in graphs)


@pytest.mark.parametrize("model_type", ["inkling_text", "inkling2_text", "zaya"])
def test_attention_convolving_on_the_cache_on_real_graphs(model_type):
    """Attention modules that run short convolutions on the cache themselves (Inkling, Inkling 2, Zaya; a full and a
    sliding-window layer each) as breaks of their own on real graphs (fp32, the experts on transformers' batched_mm,
    which captures in fp32 where grouped_mm's fallback copies from the host): eager's tokens and logits over a second
    turn and k-token continuations, decode steps through the breaks, Inkling 2's attention over its block states
    inside the graphs."""
    from test_continuation import check_continuations
    from test_hybrid import CONVOLVING_ATTENTION
    from test_latent_attention import _pair

    reference, model = (m.to("cuda") for m in _pair(model_type, **CONVOLVING_ATTENTION[model_type]))
    for twin in (reference, model):
        twin.set_experts_implementation("batched_mm")
    handle = check_continuations(reference, model, device="cuda")
    stats = handle.stats()
    assert stats["backend"] == "cuda" and stats["rejects"] == {} and stats["replays"] >= 12, stats


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_full_graph_decode_step_never_synchronizes_the_device(cache_implementation, monkeypatch):
    """generate() waits for the GPU once per step (its stopping check); bcg's part of a decode step as one graph (on a
    dynamic cache's stand-in, on a StaticCache) must add no wait, or the host's work after it leaves the GPU idle.
    CUDA's sync debug mode raises on any synchronizing call inside bcg's stack call. (Steps through the breaks build
    their masks on the host with transformers' own code, which reads the padding mask once per step, as eager does.)"""
    model = tiny_model("qwen3", device="cuda", dtype=torch.bfloat16)
    handle = bcg.wrap_model(model)
    ids, mask = left_padded_batch(device="cuda")
    generate = dict(GENERATE, cache_implementation=cache_implementation)
    model.generate(ids, attention_mask=mask, **generate)  # captures the step's graphs (capture itself synchronizes)
    runner, replays = handle.runner, handle.stats()["replays"]
    forward = runner._forward_locked

    def decode_steps_may_not_sync(call):
        if not call.is_decode_step:
            return forward(call)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(call)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner, "_forward_locked", decode_steps_may_not_sync)
    full_graph_replays = handle.stats()["full_graph_replays"]
    model.generate(ids, attention_mask=mask, **generate)
    stats = handle.stats()
    assert stats["replays"] - replays == GENERATE["max_new_tokens"] and stats["rejects"] == {}  # prefill + 7 steps
    assert stats["full_graph_replays"] - full_graph_replays == GENERATE["max_new_tokens"] - 1


def test_a_capture_that_fails_mid_way_leaves_later_captures_and_the_callers_stream_working():
    """An operation no graph can hold (a host read) invalidates a capture: the caller keeps its stream and the next
    capture succeeds (torch leaves the failed capture's pool unfit for more)."""
    backend = make_backend("cuda", torch.device("cuda"))
    x = torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="capturing"):
        backend.capture(lambda: x * x.sum().item())
    assert torch.cuda.current_stream() == stream
    graph = backend.capture(lambda: x * 3)
    x.fill_(2)
    assert graph.replay().tolist() == [6.0] * 4
    assert backend.graph_bytes() > 0


@pytest.mark.parametrize("model_type", ["bloom", "gpt_neox_japanese", "xglm", "codegen", "gptj", "falcon"])
def test_attention_outside_the_interface_on_real_graphs(model_type):
    """Attention outside the AttentionInterface (Bloom, GPT-NeoX-Japanese, XGLM; CodeGen, GPT-J and Falcon before 5.25)
    as breaks of their own on real graphs (fp32): eager's tokens and logits over a second turn and k-token
    continuations; Bloom's ALiBi biases made per call and its decode steps through the breaks, the others' decode
    steps as one graph on a stand-in (XGLM's through the breaks: see below). A full graph that fails to capture leaves
    the graph pool fit for the breakable graphs' captures."""
    from test_continuation import check_continuations
    from test_latent_attention import _pair

    reference, model = (m.to("cuda") for m in _pair(model_type))
    handle = check_continuations(reference, model, device="cuda")
    stats = handle.stats()
    assert stats["backend"] == "cuda" and stats["rejects"] == {} and stats["replays"] >= 12, stats
    # XGLM's positional embedding reads the static cache's length tensor on the host (a sync no graph can hold):
    # its full decode graph fails to capture, with a warning, and its steps take the breaks, as Bloom's do. Before
    # 5.21 eager attention's masks are built before each replay (their code copied a host scalar), and the rest still
    # decode as one graph per step. Falcon's full decode graph still copies a host tensor on 5.17 (which one is not yet
    # found; 5.25's captures), so its steps take the breaks there (found on an H100; the versions between untested).
    falcon_host_copy = model_type == "falcon" and Version(hf.installed_transformers()) < Version("5.25")
    full_graphs = model_type not in ("bloom", "xglm") and not falcon_host_copy
    assert (stats["full_graph_replays"] > 0) == full_graphs, stats

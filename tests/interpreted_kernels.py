"""The fused kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1), against eager's code.

Run by tests/test_fusion.py in a subprocess (the interpreter is chosen when the kernels are defined), not collected
on its own. The interpreter computes in NumPy: its exp is not CUDA's, libdevice's round-to-nearest products are
plain products here (NumPy's are rounded to nearest too), and it truncates where it casts to bf16 instead of rounding.
So these check what the kernels compute and where they round (fp32 to a few ulp, fp16 to one, bf16 to a few);
bit-identity with eager's CUDA kernels is checked on a GPU (tests/test_gpu.py).
"""

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from torch.nn import functional
from transformers.cache_utils import StaticCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3 import modeling_qwen3

import bcg
from bcg import fusion, kernels
from tiny_models import left_padded_batch, tiny_model

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (tests/test_fusion.py does)"
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 4}
DTYPES = list(ULP)


@pytest.fixture(autouse=True)
def interpreted_libdevice(monkeypatch):
    """The libdevice functions the kernels call, as the interpreter can run them."""
    monkeypatch.setattr(kernels, "libdevice", SimpleNamespace(mul_rn=lambda a, b: a * b, exp=lambda x: tl.exp(x)))


def assert_within_ulps(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bound = ULPS[expected.dtype] * ULP[expected.dtype] * expected.float().abs() + 1e-30
    assert ((got.float() - expected.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_then_product(dtype):
    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 7, 200, generator=generator) * 4).to(dtype)
    up = torch.randn(3, 7, 200, generator=generator).to(dtype)
    assert_within_ulps(kernels.silu_mul(gate, up), functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reads_the_halves_of_a_merged_gate_up_output(dtype):
    """A merged gate/up GEMM's ``[..., 2I]`` output: gate and up are column blocks of it, read at its row stride."""
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(3, 7, 400, generator=generator) * 4).to(dtype)
    gate, up = gate_up.split(200, dim=-1)
    got = kernels.silu_mul(gate, up)
    assert got.is_contiguous()
    assert_within_ulps(got, functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_residual_add_then_llamas_norm(dtype):
    generator = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(200, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(200, generator=generator) * 0.2 + 1)
        x = torch.randn(3, 7, 200, generator=generator).to(dtype)
        residual = (torch.randn(3, 7, 200, generator=generator) * 3).to(dtype)
        expected_sum = residual + x
        expected = norm(expected_sum)
    normed, summed = kernels.add_rms_norm(x, residual, norm.weight.detach(), norm.variance_epsilon)
    if dtype != torch.bfloat16:  # the interpreter's bf16 cast truncates
        assert torch.equal(summed, expected_sum)
    assert_within_ulps(summed, expected_sum)
    assert_within_ulps(normed, expected)


def rotary_inputs(dtype: torch.dtype, batch: int = 3, seq: int = 5, heads: int = 4, kv_heads: int = 2, dim: int = 16):
    """q and k as attention makes them (``[B, H, S, D]`` views of a projection's ``[B, S, H * D]`` output) and
    cos/sin of per-row positions."""
    generator = torch.Generator().manual_seed(2)
    q = (torch.randn(batch, seq, heads * dim, generator=generator) * 3).to(dtype)
    k = (torch.randn(batch, seq, kv_heads * dim, generator=generator) * 3).to(dtype)
    angles = torch.rand(batch, seq, dim // 2, generator=generator) * 512
    emb = torch.cat((angles, angles), dim=-1)
    heads_of = lambda x: x.view(batch, seq, -1, dim).transpose(1, 2)  # noqa: E731
    return heads_of(q), heads_of(k), emb.cos().to(dtype), emb.sin().to(dtype)


def head_norms(dtype: torch.dtype, dim: int = 16) -> tuple[LlamaRMSNorm, LlamaRMSNorm]:
    generator = torch.Generator().manual_seed(3)
    norms = LlamaRMSNorm(dim, eps=1e-6).to(dtype), LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.randn(dim, generator=generator) * 0.2 + 1)
    return norms


def assert_rotated_within_ulps(got: torch.Tensor, expected: torch.Tensor, normed: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Within a few ulps of the products the rotation adds (``|x1 cos| + |x2 sin|``): a sum near zero may lose every
    digit its operands agree on to their rounding."""
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
    half = normed.shape[-1] // 2
    rotated = torch.cat((normed[..., half:], normed[..., :half]), dim=-1).float().abs()
    scale = normed.float().abs() * cos.float().abs().unsqueeze(1) + rotated * sin.float().abs().unsqueeze(1)
    bound = 2 * ULPS[expected.dtype] * ULP[expected.dtype] * scale + 1e-30
    assert ((got.float() - expected.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_of_q_and_k_is_llamas_rotary(dtype):
    q, k, cos, sin = rotary_inputs(dtype)
    for c, s in ((cos, sin), (cos[:1], sin[:1])):  # per-row positions, and one set broadcast over the batch
        got, expected = kernels.rotary(q, k, c, s), apply_rotary_pos_emb(q, k, c, s)
        for x, want, rotated in zip(got, expected, (q, k)):
            if dtype != torch.bfloat16:  # the interpreter's bf16 cast truncates
                assert torch.equal(x, want)
            assert_rotated_within_ulps(x, want, rotated, c, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_with_norms_is_each_heads_rms_norm_then_llamas_rotary(dtype):
    """Qwen3's attention: q_norm / k_norm over each head's dims, then the rotary embedding of the normed heads."""
    q, k, cos, sin = rotary_inputs(dtype)
    q_norm, k_norm = head_norms(dtype)
    with torch.no_grad():
        normed_q, normed_k = q_norm(q.transpose(1, 2)).transpose(1, 2), k_norm(k.transpose(1, 2)).transpose(1, 2)
        expected = apply_rotary_pos_emb(normed_q, normed_k, cos, sin)
    got = kernels.rotary(q, k, cos, sin, norms=((q_norm.weight.detach(), q_norm.variance_epsilon),
                                                (k_norm.weight.detach(), k_norm.variance_epsilon)))
    for x, want, normed in zip(got, expected, (normed_q, normed_k)):
        assert_rotated_within_ulps(x, want, normed, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_cache_is_index_copy_at_the_length(dtype):
    """Keys and values (v of another head dim) at the counter's positions, as a StaticLayer's two index_copy_ put
    them; past the cache's end nothing is written (index_copy_ would fault)."""
    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(3, 2, 12, 16).to(dtype), torch.randn(3, 2, 12, 8).to(dtype)
    new_keys = torch.randn(3, 4, 2, 16, generator=generator).to(dtype).transpose(1, 2)  # attention's layout
    new_values = torch.randn(3, 4, 2, 8, generator=generator).to(dtype).transpose(1, 2)
    for start in (0, 5, 10):
        got_keys, got_values = keys.clone(), values.clone()
        kernels.write_cache(got_keys, got_values, new_keys, new_values, torch.tensor(start))
        written = torch.arange(start, min(start + 4, 12))
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_keys.index_copy_(2, written, new_keys[:, :, :len(written)])
        expected_values.index_copy_(2, written, new_values[:, :, :len(written)])
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)


def test_a_fused_cache_update_leaves_what_transformers_update_leaves(kernel_calls):
    """bcg's StaticLayer update against the installed transformers' own (run on every version CI covers): the same
    keys, values and length counter after two steps, the same tensors returned. A release that changes what a static
    layer's update does fails here."""
    model = tiny_model("qwen3")
    generator = torch.Generator().manual_seed(5)
    steps = [tuple(torch.randn(2, 2, s, 16, generator=generator) for _ in range(2)) for s in (3, 1)]
    caches = []
    for fused in (False, True):
        cache = static_cache_for(model, batch=2)
        updates = fusion._cache_updates_fused(cache) if fused else contextlib.nullcontext()
        with updates:
            returned = [cache.update(k, v, 0) for k, v in steps]
        layer = cache.layers[0]
        assert all(r == (layer.keys, layer.values) for r in returned)
        assert "update" not in vars(layer)
        caches.append(cache)
    assert kernel_calls["write_cache"] == len(steps)
    reference, fused = (c.layers[0] for c in caches)
    assert torch.equal(fused.keys, reference.keys) and torch.equal(fused.values, reference.values)
    assert torch.equal(fused.cumulative_length, reference.cumulative_length)


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """The kernels take CPU tensors (fp32), and count their calls (rotary: those with the q/k norms)."""
    calls = {"silu_mul": 0, "add_rms_norm": 0, "rotary": 0, "write_cache": 0}

    def counted(name):
        kernel = getattr(kernels, name)

        def run(*args, **kwargs):
            calls[name] += name != "rotary" or "norms" in kwargs
            return kernel(*args, **kwargs)
        return run

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    monkeypatch.setattr(fusion, "_kernels_take", lambda *tensors: all(t.dtype == torch.float32 for t in tensors))
    return calls


def static_cache_for(model: torch.nn.Module, batch: int) -> StaticCache:
    """An allocated StaticCache (a full decode graph's are: bcg fuses the writes of allocated layers only)."""
    config = model.config
    cache = StaticCache(config=config, max_cache_len=16)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype, model.device)
    return cache


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("static_cache", [False, True])
@pytest.mark.parametrize("merged", [False, True])
def test_a_model_with_every_fusion_running_matches_eager(arch, static_cache, merged, kernel_calls):
    """fp32: bcg's decoder layer and MLP forwards with the kernels, Qwen3's q/k norms inside its rotary kernel and, on a
    StaticCache, the cache's writes in one kernel per layer, on CPU tensors: eager's logits and cache; ``merged``: with
    q/k/v and gate/up as one GEMM each (the SiLU kernel reading the halves of gate/up's output, the rotary kernel and
    the cache write q, k and v as column blocks of one)."""
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    layers = model.config.num_hidden_layers
    caches = [static_cache_for(model, ids.shape[0]) if static_cache else None for _ in range(2)]
    name = bcg.hf.cache_argument(model.forward)
    fusions = fusion.find_fusions(model.model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **{name: caches[0]}).logits
        if merged:
            fusions.merge_projections(model)
            assert len(fusions.qkv) == len(fusions.gate_up) == layers
        with fusions.installed(caches[1]):
            logits = model(input_ids=ids, attention_mask=mask, **{name: caches[1]}).logits
    assert kernel_calls == {"silu_mul": layers, "add_rms_norm": layers, "rotary": layers if arch == "qwen3" else 0,
                            "write_cache": layers if static_cache else 0}
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    if static_cache:
        for got, want in zip(caches[1].layers, caches[0].layers):  # a later layer's inputs differ by rounding
            torch.testing.assert_close((got.keys, got.values), (want.keys, want.values), atol=1e-5, rtol=1e-5)
            assert torch.equal(got.cumulative_length, want.cumulative_length)


def test_deferred_norms_run_where_the_rotary_kernel_cannot(kernel_calls):
    """Heads whose q_norm / k_norm left them to the rotary call, then a rotary call the kernel does not take (an
    extra positional argument): the norms run as the model's (the fused RMSNorm) before the model's own rotary code."""
    model = tiny_model("qwen3")
    attention = model.model.layers[0].self_attn
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16)
    cos, sin = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = modeling_qwen3.apply_rotary_pos_emb(attention.q_norm(q).transpose(1, 2),
                                                       attention.k_norm(k).transpose(1, 2), cos, sin)
        with fusion.find_fusions(model.model).installed():
            deferred_q, deferred_k = attention.q_norm(q), attention.k_norm(k)
            assert deferred_q is q and deferred_k is k
            got = modeling_qwen3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
    assert kernel_calls["rotary"] == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_wrapped_fast_graphs_run_the_kernels_between_breaks_and_exact_ones_do_not(mode, kernel_calls, monkeypatch):
    """The eager backend's runs of the graphs, attention through bcg's breaks: greedy tokens equal eager's."""
    monkeypatch.setattr(bcg.wrap, "unavailable_reason", lambda device: None)  # as on a GPU with triton
    model, reference = tiny_model("qwen3"), tiny_model("qwen3")
    ids, mask = left_padded_batch()
    generate = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **generate)
    handle = bcg.wrap_model(model, backend="eager", mode=mode)
    tokens = model.generate(ids, **generate)
    assert torch.equal(tokens, expected)
    assert handle.stats()["rejects"] == {}
    fused, layers = handle.stats()["fused_kernels"], model.config.num_hidden_layers
    if mode == "fast":  # prompts through the breaks, decode steps as full graphs on a stand-in
        assert fused["add_rms_norm"] == fused["qk_norm_rotary"] == fused["cache_write"] == layers
        assert fused["qkv_gemm"] == fused["gate_up_gemm"] == layers
        assert all(calls > 0 for calls in kernel_calls.values()), kernel_calls
        assert handle.stats()["full_graph_replays"] > 0
    else:
        assert fused == {} and set(kernel_calls.values()) == {0}

"""The fused kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1), against eager's code.

Run by tests/test_fusion.py in a subprocess (the interpreter is chosen when the kernels are defined), not collected
on its own. The interpreter computes in NumPy: its exp is not CUDA's, libdevice's round-to-nearest products are
plain products here (NumPy's are rounded to nearest too), and it truncates where it casts to bf16 instead of rounding.
So these check what the kernels compute and where they round (fp32 to a few ulp, fp16 to one, bf16 to a few);
bit-identity with eager's CUDA kernels is checked on a GPU (tests/test_gpu.py).
"""

import os
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from torch.nn import functional
from transformers.models.llama.modeling_llama import LlamaRMSNorm

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


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """The kernels take CPU tensors (fp32), and count their SwiGLU and add + norm calls."""
    calls = {"silu_mul": 0, "add_rms_norm": 0}

    def counted(name):
        kernel = getattr(kernels, name)

        def run(*args):
            calls[name] += 1
            return kernel(*args)
        return run

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    monkeypatch.setattr(fusion, "_kernels_take", lambda *tensors: all(t.dtype == torch.float32 for t in tensors))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_model_with_every_fusion_running_matches_eager(arch, kernel_calls):
    """fp32: bcg's decoder layer and MLP forwards with the kernels, on CPU tensors."""
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with fusion.find_fusions(model.model).installed():
            logits = model(input_ids=ids, attention_mask=mask).logits
    layers = model.config.num_hidden_layers
    assert kernel_calls == {"silu_mul": layers, "add_rms_norm": layers}
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


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
    if mode == "fast":
        assert handle.stats()["fused_kernels"]["add_rms_norm"] == model.config.num_hidden_layers
        assert kernel_calls["silu_mul"] > 0 and kernel_calls["add_rms_norm"] > 0
    else:
        assert handle.stats()["fused_kernels"] == {} and kernel_calls == {"silu_mul": 0, "add_rms_norm": 0}

"""Triton kernels that compute transformers' Llama-style RMSNorm, rotary embedding and SwiGLU, each in one launch.

The model's own code launches 8 kernels per RMSNorm, 10 per rotary call, 2 for SwiGLU's activation and product and
one more for the residual add before a norm; inside a graph each still costs a few microseconds of GPU time, which
is most of a small model's step. These kernels keep the model's rounding: every op the model runs in the input
dtype is rounded to it here too, so the rotary embedding, SwiGLU and the residual add are bit-identical and RMSNorm
differs only by the order of the fp32 sum of squares. Imported only when ``fused_kernels=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SUPPORTED_DTYPES = frozenset(_TRITON_DTYPES)


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, sum_ptr, rows, x_row_stride, residual_row_stride,
                     out_row_stride, n_cols, eps, inv_n,
                     ADD_RESIDUAL: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    col = tl.arange(0, BLOCK_N)[None, :]
    mask = (row < rows) & (col < n_cols)
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:  # the decoder layer's ``residual + hidden_states``: rounded to DTYPE before the norm reads it
        residual = tl.load(residual_ptr + row.to(tl.int64) * residual_row_stride + col, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(DTYPE)
        tl.store(sum_ptr + row.to(tl.int64) * out_row_stride + col, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = libdevice.mul_rn(tl.sum(x * x, axis=1, keep_dims=True), inv_n)
    normed = (x * tl.math.rsqrt(variance + eps)).to(DTYPE).to(tl.float32)
    weight = tl.load(w_ptr + col, mask=col < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * out_row_stride + col, (weight * normed).to(DTYPE), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`` over the last dim, as LlamaRMSNorm."""
    return _launch_rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm(residual + x)`` and ``residual + x`` (rounded to x's dtype, as eager adds them); both x's shape."""
    return _launch_rms_norm(x, residual, weight, eps)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the norm, the sum it normed): of ``residual + x`` where a residual is given, else of x (which it returns)."""
    n_cols = x.shape[-1]
    rows_view = x.reshape(-1, n_cols)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty_like(out)
    residual_rows = rows_view if residual is None else residual.reshape(-1, n_cols)
    rows = rows_view.shape[0]
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = 8 if block_n * block_m >= 4096 else 4
    _rms_norm_kernel[(triton.cdiv(rows, block_m),)](
        rows_view, residual_rows, weight, out, summed, rows, rows_view.stride(0), residual_rows.stride(0), n_cols,
        n_cols, eps, 1.0 / n_cols, ADD_RESIDUAL=residual is not None, DTYPE=_TRITON_DTYPES[x.dtype],
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, summed


@triton.jit
def _rounded_product(a, b, DTYPE: tl.constexpr):
    """``a * b`` as an eager op in ``DTYPE`` returns it (rounded to DTYPE), back in fp32; never fused into an FMA."""
    return libdevice.mul_rn(a, b).to(DTYPE).to(tl.float32)


@triton.jit(do_not_specialize=["seq_len", "heads"])
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, heads,
                   x_sb, x_sh, x_ss, o_sb, o_sh, o_ss, c_sb, c_ss,
                   HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0) // seq_len
    s = tl.program_id(0) % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    d_mask = d < HALF
    mask = (h < heads) & d_mask
    c_base = b.to(tl.int64) * c_sb + s.to(tl.int64) * c_ss
    cos1 = tl.load(cos_ptr + c_base + d, mask=d_mask).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_base + HALF + d, mask=d_mask).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_base + d, mask=d_mask).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_base + HALF + d, mask=d_mask).to(tl.float32)
    x_at = x_ptr + b.to(tl.int64) * x_sb + s.to(tl.int64) * x_ss + h * x_sh + d
    x1 = tl.load(x_at, mask=mask).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=mask).to(tl.float32)
    # (x * cos) + (rotate_half(x) * sin), each product and the sum rounded to the input dtype as eager does
    out1 = _rounded_product(x1, cos1, DTYPE) + _rounded_product(-x2, sin1, DTYPE)
    out2 = _rounded_product(x2, cos2, DTYPE) + _rounded_product(x1, sin2, DTYPE)
    o_at = out_ptr + b.to(tl.int64) * o_sb + s.to(tl.int64) * o_ss + h * o_sh + d
    tl.store(o_at, out1.to(DTYPE), mask=mask)
    tl.store(o_at + HALF, out2.to(DTYPE), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, x ``[B, H, S, D]`` (any strides, dense last dim), cos/sin ``[B|1, S, D]``."""
    batch, heads, seq_len, dim = x.shape
    out = torch.empty_like(x)  # keeps x's layout, as the eager ops do
    cos_batch_stride = cos.stride(0) if cos.shape[0] == batch else 0
    _rotary_kernel[(batch * seq_len,)](
        x, cos, sin, out, seq_len, heads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos_batch_stride, cos.stride(1),
        HALF=dim // 2, DTYPE=_TRITON_DTYPES[x.dtype], BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4,
    )
    return out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offset < n
    gate = tl.load(gate_ptr + offset, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + offset, mask=mask).to(tl.float32)
    # torch's silu: x / (1 + exp(-x)) in fp32 with CUDA's expf (libdevice's: tl.exp is a coarser approximation) and
    # IEEE division, rounded to DTYPE as its output tensor is; then the product as the second eager op rounds it
    silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(DTYPE).to(tl.float32)
    tl.store(out_ptr + offset, _rounded_product(silu, up, DTYPE).to(DTYPE), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (contiguous tensors of one shape), as a SwiGLU MLP's activation and product."""
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, DTYPE=_TRITON_DTYPES[gate.dtype], BLOCK=block,
                                               num_warps=4)
    return out

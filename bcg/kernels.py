"""Triton kernels that compute transformers' Llama-style RMSNorm, rotary embedding and SwiGLU, each in one launch, and
write a static cache layer's keys and values in one.

The model's own code launches 8 kernels per RMSNorm, 10 per rotary call, 2 for SwiGLU's activation and product and
one more for the residual add before a norm; a static cache layer's update launches 5 (positions, their offset, the
length's advance and one copy each for keys and values). Inside a graph each still costs a few microseconds of GPU
time, which is most of a small model's step. These kernels keep the model's rounding: every op the model runs in the
input dtype is rounded to it here too, so the rotary embedding, SwiGLU and the residual add are bit-identical and
RMSNorm differs only by the order of the fp32 sum of squares (a rotary embedding of normed heads, as Qwen3's
attention computes it, inherits that difference and adds none). Imported only when ``fused_kernels=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SUPPORTED_DTYPES = frozenset(_TRITON_DTYPES)


@triton.jit
def _rounded_product(a, b, DTYPE: tl.constexpr):
    """``a * b`` as an eager op in ``DTYPE`` returns it (rounded to DTYPE), back in fp32; never fused into an FMA."""
    return libdevice.mul_rn(a, b).to(DTYPE).to(tl.float32)


@triton.jit
def _llama_rms_norm(x, sum_of_squares, inv_n, eps, weight, DTYPE: tl.constexpr):
    """LlamaRMSNorm of fp32 rows ``x`` given their sums of squares (kept dims): ``weight * (x * rsqrt(mean + eps))``
    with the normed rows rounded to DTYPE before the weight's product, as the model's ``.to(input_dtype)`` does; the
    result rounded to DTYPE, in fp32."""
    variance = libdevice.mul_rn(sum_of_squares, inv_n)
    normed = (x * tl.math.rsqrt(variance + eps)).to(DTYPE).to(tl.float32)
    return _rounded_product(weight, normed, DTYPE)


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
    weight = tl.load(w_ptr + col, mask=col < n_cols, other=0.0).to(tl.float32)
    normed = _llama_rms_norm(x, tl.sum(x * x, axis=1, keep_dims=True), inv_n, eps, weight, DTYPE)
    tl.store(out_ptr + row.to(tl.int64) * out_row_stride + col, normed.to(DTYPE), mask=mask)


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


@triton.jit(do_not_specialize=["seq_len", "q_heads", "k_heads"])
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr,
                   seq_len, q_heads, k_heads, q_eps, k_eps, inv_dim,
                   q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss, c_sb, c_ss,
                   NORM: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK_QH: tl.constexpr,
                   BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (tokens, 2): the second axis picks q or k, every head of one token's q (k) in one program."""
    b = (tl.program_id(0) // seq_len).to(tl.int64)
    s = (tl.program_id(0) % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < HALF
    c_at = b * c_sb + s * c_ss + d
    cos1 = tl.load(cos_ptr + c_at, mask=d_mask).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_at + HALF, mask=d_mask).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_at, mask=d_mask).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_at + HALF, mask=d_mask).to(tl.float32)
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr + b * q_sb + s * q_ss, q_sh, q_out_ptr + b * qo_sb + s * qo_ss, qo_sh, q_heads,
                      q_weight_ptr, q_eps, inv_dim, cos1, cos2, sin1, sin2, NORM, HALF, DTYPE, BLOCK_QH, BLOCK_D)
    else:
        _rotate_heads(k_ptr + b * k_sb + s * k_ss, k_sh, k_out_ptr + b * ko_sb + s * ko_ss, ko_sh, k_heads,
                      k_weight_ptr, k_eps, inv_dim, cos1, cos2, sin1, sin2, NORM, HALF, DTYPE, BLOCK_KH, BLOCK_D)


@triton.jit
def _rotate_heads(x_ptr, x_sh, out_ptr, o_sh, heads, weight_ptr, eps, inv_dim, cos1, cos2, sin1, sin2,
                  NORM: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One token's heads, each the two halves of its dims: normed (NORM: the head's RMSNorm, as the model's q_norm /
    k_norm computes it, the halves' sums of squares added), then rotated."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    x_at = x_ptr + h * x_sh + d
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        sum_of_squares = tl.sum(x1 * x1, axis=1, keep_dims=True) + tl.sum(x2 * x2, axis=1, keep_dims=True)
        weight1 = tl.load(weight_ptr + d, mask=d < HALF).to(tl.float32)
        weight2 = tl.load(weight_ptr + HALF + d, mask=d < HALF).to(tl.float32)
        x1 = _llama_rms_norm(x1, sum_of_squares, inv_dim, eps, weight1, DTYPE)
        x2 = _llama_rms_norm(x2, sum_of_squares, inv_dim, eps, weight2, DTYPE)
    # (x * cos) + (rotate_half(x) * sin), each product and the sum rounded to the input dtype as eager does
    out1 = _rounded_product(x1, cos1, DTYPE) + _rounded_product(-x2, sin1, DTYPE)
    out2 = _rounded_product(x2, cos2, DTYPE) + _rounded_product(x1, sin2, DTYPE)
    o_at = out_ptr + h * o_sh + d
    tl.store(o_at, out1.to(DTYPE), mask=mask)
    tl.store(o_at + HALF, out2.to(DTYPE), mask=mask)


NormWeights = tuple[torch.Tensor, float]  # an RMSNorm's weight and eps


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           norms: tuple[NormWeights, NormWeights] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` in one launch; with ``norms`` (q's and k's), of each head normed first
    as Llama's RMSNorm over the head dim (Qwen3's ``q_norm`` / ``k_norm``). q and k ``[B, H, S, D]`` (any strides, dense
    last dim; their head counts may differ), cos/sin ``[B|1, S, D]``; each output keeps its input's layout, as eager's
    ops do."""
    batch, q_heads, seq_len, dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    (q_weight, q_eps), (k_weight, k_eps) = norms or ((q, 0.0), (k, 0.0))  # no norm: the weights are never read
    cos_batch_stride = cos.stride(0) if cos.shape[0] == batch else 0
    _rotary_kernel[(batch * seq_len, 2)](
        q, k, q_out, k_out, cos, sin, q_weight, k_weight, seq_len, q_heads, k.shape[1], q_eps, k_eps, 1.0 / dim,
        *_head_strides(q), *_head_strides(k), *_head_strides(q_out), *_head_strides(k_out),
        cos_batch_stride, cos.stride(1),
        NORM=norms is not None, HALF=dim // 2, DTYPE=_TRITON_DTYPES[q.dtype],
        BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(dim // 2), num_warps=4,
    )
    return q_out, k_out


def _head_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a ``[B, H, S, D]`` tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_row_stride, up_row_stride,
                     DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): gate and up read at their own row strides (a merged gate/up GEMM's output holds
    them side by side in each row), the output written contiguous."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + col, mask=mask).to(tl.float32)
    # torch's silu: x / (1 + exp(-x)) in fp32 with CUDA's expf (libdevice's: tl.exp is a coarser approximation) and
    # IEEE division, rounded to DTYPE as its output tensor is; then the product as the second eager op rounds it
    silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(DTYPE).to(tl.float32)
    tl.store(out_ptr + row * n_cols + col, _rounded_product(silu, up, DTYPE).to(DTYPE), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as a SwiGLU MLP's activation and product, as a new contiguous tensor: gate and up of one
    shape, each viewable as rows of its dense last dim (contiguous tensors, or the two halves of a merged gate/up
    projection's ``[..., 2I]`` output)."""
    n_cols = gate.shape[-1]
    gate_rows, up_rows = gate.view(-1, n_cols), up.view(-1, n_cols)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(n_cols, block))](
        gate_rows, up_rows, out, n_cols, gate_rows.stride(0), up_rows.stride(0), DTYPE=_TRITON_DTYPES[gate.dtype],
        BLOCK=block, num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=["seq_len", "heads", "capacity"])
def _cache_write_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, length_ptr, seq_len, heads, capacity,
                        k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, keys_sb, keys_sh, keys_ss, values_sb, values_sh, values_ss,
                        K_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KD: tl.constexpr,
                        BLOCK_VD: tl.constexpr):
    """One program per new token: its keys and values, every head, to the cache position the length counter holds
    (read on the device, so a graph replays it at each step's position) plus the token's index."""
    b = (tl.program_id(0) // seq_len).to(tl.int64)
    s = (tl.program_id(0) % seq_len).to(tl.int64)
    position = tl.load(length_ptr).to(tl.int64) + s
    heads = tl.where(position < capacity, heads, 0)  # index_copy_ would fault past the end; nothing is written there
    _copy_heads(k_ptr + b * k_sb + s * k_ss, k_sh, keys_ptr + b * keys_sb + position * keys_ss, keys_sh, heads,
                K_DIM, BLOCK_H, BLOCK_KD)
    _copy_heads(v_ptr + b * v_sb + s * v_ss, v_sh, values_ptr + b * values_sb + position * values_ss, values_sh, heads,
                V_DIM, BLOCK_H, BLOCK_VD)


@triton.jit
def _copy_heads(source_ptr, source_sh, target_ptr, target_sh, heads, DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < DIM)
    tl.store(target_ptr + h * target_sh + d, tl.load(source_ptr + h * source_sh + d, mask=mask), mask=mask)


def write_cache(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                length: torch.Tensor) -> None:
    """``keys.index_copy_(2, positions, new_keys)`` and the same for values in one launch, ``positions`` being
    ``length`` (a 0-dim counter on the device) plus ``arange(S)``, as a static cache layer's update writes them.
    The caches ``[B, H, T, D]``, the new ``[B, H, S, D]`` (any strides, dense last dims)."""
    batch, heads, seq_len, k_dim = new_keys.shape
    v_dim = new_values.shape[-1]
    _cache_write_kernel[(batch * seq_len,)](
        new_keys, new_values, keys, values, length, seq_len, heads, keys.shape[2],
        *_head_strides(new_keys), *_head_strides(new_values), *_head_strides(keys), *_head_strides(values),
        K_DIM=k_dim, V_DIM=v_dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_KD=triton.next_power_of_2(k_dim),
        BLOCK_VD=triton.next_power_of_2(v_dim), num_warps=4,
    )

"""Attention of a packed prompt per request: variable-length attention over the real tokens only (issue #13).

A padded multi-token call runs only its real tokens through the graph segments (``LiveContext.rows``). Its attention
breaks can either scatter them back into the padded ``[B, S]`` layout and call the model's own attention with the
padding mask (exact mode: eager's kernel on eager's shapes), or, here, attend each request's run of real tokens to
itself without ever building the padded query or mask: torch's own flash kernel over cumulative offsets
(``torch.nn.attention.varlen.varlen_attn``, the same algorithm transformers' flash-attention path runs on unpadded
tokens) where it runs, one causal SDPA per request elsewhere (CPU, fp32). Measured on an H200
(``results/varlen_attention/varlen_attention_qwen3-*.md``): 0.21-0.32 ms against the padded path's 0.32-0.58 ms at 8
and 32 requests of ~128 tokens; nested-tensor SDPA (3.7-6.2 ms) and FlexAttention (6-8 ms with its per-call block
mask) lose.

Eligible: a call on an empty cache whose every request's real tokens are one contiguous run (left or right padding),
and attention that transformers' flash path could run from its kwargs alone (causal, optional sliding window and
scale, no softcap, sinks or dropout).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Attention kwargs the varlen kernel honours (a layer passing anything else keeps the padded path).
_HONOURED_KWARGS = frozenset({"dropout", "scaling", "sliding_window", "softcap"})
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Requests:
    """Where each request's real tokens lie in the packed run (requests without real tokens left out)."""

    offsets: torch.Tensor  # int32 [R + 1] on the call's device: cumulative token counts
    lengths: tuple[int, ...]

    @property
    def longest(self) -> int:
        return max(self.lengths)


def requests_of(attention_mask: torch.Tensor, seq: int) -> Requests | None:
    """The packed requests of a 2D-masked call on an empty cache, or None where per-request attention would not be
    eager's: some row's real tokens are not one contiguous run (a mask with holes: the packed run's windows would
    differ), or the mask is wider than the call."""
    if attention_mask.shape[-1] != seq:  # wider than the call on an empty cache: eager reads its first columns
        return None
    real = attention_mask.cpu() != 0  # one host read per prompt, beside the packing's own
    counts = real.sum(1)
    first = real.int().argmax(1)
    index = torch.arange(seq)
    runs = (index >= first[:, None]) & (index < (first + counts)[:, None])
    if not torch.equal(runs, real):
        return None
    lengths = tuple(n for n in counts.tolist() if n)
    offsets = torch.tensor((0, *torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return Requests(offsets.to(attention_mask.device, non_blocking=True), lengths)


def honours(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether a layer's attention, called with ``kwargs`` (its per-layer constants), is plain causal attention with
    at most a sliding window and a scale: what the varlen kernel computes."""
    return (getattr(module, "is_causal", True) is True
            and set(kwargs) <= _HONOURED_KWARGS
            and not kwargs.get("dropout")
            and kwargs.get("softcap") is None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requests: Requests, scaling: float | None,
              sliding_window: int | None) -> torch.Tensor:
    """Causal attention of each request's tokens to its own earlier ones (within ``sliding_window``, transformers'
    meaning: a key at most ``sliding_window - 1`` tokens back): ``[T, heads, dim]`` in, ``[T, heads, dim]`` out."""
    window = sliding_window if sliding_window is not None and sliding_window < requests.longest else None
    kernel = _flash_varlen()
    if kernel is not None and q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= _FLASH_MAX_HEAD_DIM:
        return kernel(q, k, v, requests, scaling, window)
    return _per_request(q, k, v, requests, scaling, window)


def _per_request(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requests: Requests, scaling: float | None,
                 window: int | None) -> torch.Tensor:
    out = q.new_empty(*q.shape[:2], v.shape[-1])
    start = 0
    for n in requests.lengths:
        rows = slice(start, start + n)
        qr, kr, vr = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if window is None:
            mask, causal = None, True
        else:
            index = torch.arange(n, device=q.device)
            back = index[:, None] - index[None, :]
            mask, causal = (back >= 0) & (back < window), False
        result = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, is_causal=causal, scale=scaling,
                                                enable_gqa=qr.shape[1] != kr.shape[1])
        out[rows] = result[0].transpose(0, 1)
        start += n
    return out


class _FlashVarlen:
    """``torch.nn.attention.varlen.varlen_attn`` (torch 2.10+: ``scale`` and ``window_size``; 2.12+: ``enable_gqa``)."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.gqa = "enable_gqa" in inspect.signature(function).parameters

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requests: Requests, scaling: float | None,
                 window: int | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"scale": scaling, "window_size": (-1 if window is None else window - 1, 0)}
        if self.gqa:
            kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
        elif q.shape[1] != k.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        offsets, longest = requests.offsets, requests.longest
        return self.function(q, k, v, offsets, offsets, longest, longest, **kwargs)


@cache
def _flash_varlen() -> _FlashVarlen | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.9
        return None
    options = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size"} <= set(options):  # torch 2.9: causal only, no scale
        return None
    return _FlashVarlen(varlen_attn)

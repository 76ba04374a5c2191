"""Decode attention over a static cache, by method: why bcg's fast full decode graphs hand SDPA grouped keys (#16).

One query token per sequence against keys/values ``[B, Hkv, 512, D]`` with a boolean mask (300 positions live), as a
full decode graph on a static cache runs it; each variant timed inside a CUDA graph (µs per call) under SDPA's own
choice and under each backend alone (n/a: that backend refuses), and checked against the first:

- ``repeat_kv+mask``: keys/values repeated per query head, then SDPA with the mask (transformers' SDPA attention
  beside a mask up to 5.23)
- ``enable_gqa+mask``: grouped keys/values as they are, with the mask (bcg's fast full decode graphs)
- ``fold+mask``: the query heads of a group packed along the query axis (transformers 5.24's ``pack_gqa``)
- ``flash no mask L``: the live positions only, no mask (what a kernel taking per-sequence lengths would reach)

    python scripts/bench_decode_attention.py > results/decode_attention/decode_attention_h200.txt   # needs CUDA
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

POSITIONS, HEAD_DIM, LIVE = 512, 128, 300
BACKENDS = (None, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)


def graph_us(fn: Callable[[], torch.Tensor], iters: int = 200) -> float:
    """µs per call of ``fn`` replayed from a CUDA graph of 10 calls (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(iters // 10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def variants(batch: int, heads: int, kv_heads: int) -> dict[str, Callable[[], torch.Tensor]]:
    q = torch.randn(batch, heads, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, POSITIONS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(batch, 1, 1, POSITIONS, dtype=torch.bool, device="cuda")
    mask[..., :LIVE] = True
    group = heads // kv_heads

    def repeated(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None].expand(batch, kv_heads, group, POSITIONS, HEAD_DIM).reshape(batch, heads, POSITIONS,
                                                                                          HEAD_DIM)

    return {
        "repeat_kv+mask": lambda: F.scaled_dot_product_attention(q, repeated(k), repeated(v), attn_mask=mask),
        "enable_gqa+mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "fold+mask": lambda: F.scaled_dot_product_attention(q.view(batch, kv_heads, group, HEAD_DIM), k, v,
                                                            attn_mask=mask).view(batch, heads, 1, HEAD_DIM),
        "flash no mask L": lambda: F.scaled_dot_product_attention(q, k[:, :, :LIVE], v[:, :, :LIVE], enable_gqa=True),
    }


def main() -> None:
    for heads, kv_heads in ((16, 8), (32, 8)):  # Qwen3-0.6B's and Qwen3-8B's heads
        for batch in (1, 8):
            methods = variants(batch, heads, kv_heads)
            reference = methods["repeat_kv+mask"]().float()
            row = [f"Hq{heads}/Hkv{kv_heads} B{batch}:"]
            for name, fn in methods.items():
                for backend in BACKENDS:
                    label = f"{name}[{backend.name if backend else 'default'}]"
                    try:
                        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                            error = (fn().float() - reference).abs().max().item()
                            us = graph_us(fn)
                        row.append(f"{label} {us:.1f}us err {error:.1e}")
                    except Exception as exception:  # the backend refuses these inputs
                        row.append(f"{label} n/a ({type(exception).__name__})")
            print("\n  ".join(row))


if __name__ == "__main__":
    main()

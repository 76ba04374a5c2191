"""Attention for a packed multi-request prefill, by method: what a break could run instead of padding (#13).

bcg's packed prefill computes only the real tokens in its graph segments, but each attention break still scatters them
into the padded ``[B, S]`` layout, runs SDPA with a padding + causal mask, and gathers the real rows back. This script
times that against the variable-length alternatives torch offers, on the same packed q/k/v (``[T, heads, dim]``, the
bridges' layout), and checks each against per-request causal SDPA on the real tokens:

- ``padded``: scatter, SDPA with a boolean ``[B, 1, S, S]`` mask, gather (what the break does today)
- ``per-request``: one causal SDPA per request on its own tokens (the reference)
- ``nested``: one SDPA call on jagged nested tensors (``torch.nested``, layout=torch.jagged), causal (torch 2.13 on
  CPU: "Nested tensors for query / key are not supported when is_causal=True"; kept to see what CUDA says)
- ``flex``: FlexAttention over the packed run with a block mask of "same request and causal" (compiled on CUDA;
  the block mask is built per call, as lengths change per call, and timed with it)
- ``torch-varlen``: ``torch.nn.attention.varlen.varlen_attn``, torch's own flash kernel over cumulative offsets
  (CUDA only; no install beyond torch)
- ``flash-varlen``: ``flash_attn_varlen_func`` when flash-attn is installed

    python scripts/bench_varlen_attention.py                                     # Qwen3-0.6B heads, 8 and 32 x 128
    python scripts/bench_varlen_attention.py --heads 32 8 --requests 8 --lengths 128 512   # Qwen3-8B's heads
    python scripts/bench_varlen_attention.py --device cpu --requests 3 --lengths 16       # the code path, no speed

Writes ``results/varlen_attention/varlen_attention.{json,md}`` (``--out-dir``, ``--out-name``) and ends by naming them.

Exits 1 when a method that ran differs from the reference by more than the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from benchutil import add_out_dir, announce_device
from report import print_written, write_results

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Packed:
    """q/k/v of R requests' real tokens back to back (``[T, heads, dim]``) and where each request starts."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int]

    @property
    def offsets(self) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], device=self.q.device)


def make_packed(requests: int, mean: int, spread: float, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> Packed:
    generator = torch.Generator().manual_seed(seed * 1000 + requests * 10 + mean)
    low, high = max(1, round((1 - spread) * mean)), max(1, round((1 + spread) * mean))
    lengths = torch.randint(low, high + 1, (requests,), generator=generator).tolist()
    total = sum(lengths)

    def tensor(h: int) -> torch.Tensor:
        return torch.randn(total, h, dim, generator=generator).to(device=device, dtype=dtype)

    return Packed(tensor(heads), tensor(kv_heads), tensor(kv_heads), lengths)


def per_request(p: Packed) -> torch.Tensor:
    out, start = [], 0
    for n in p.lengths:
        q, k, v = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (p.q, p.k, p.v))
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def padded(p: Packed) -> torch.Tensor:
    """Left-padded like a generate() prefill: scatter the real rows, SDPA with the mask, gather them back."""
    batch, seq = len(p.lengths), max(p.lengths)
    lengths = torch.tensor(p.lengths, device=p.q.device)
    real = torch.arange(seq, device=p.q.device) >= seq - lengths[:, None]  # [B, S]
    rows = real.reshape(-1).nonzero().squeeze(1)  # bcg computes these once per call (live.real_rows)

    def scatter(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(batch * seq, *t.shape[1:])
        return out.index_copy_(0, rows, t).view(batch, seq, *t.shape[1:]).transpose(1, 2)

    causal = torch.ones(seq, seq, dtype=torch.bool, device=p.q.device).tril()
    # a pad query sees itself only (no row fully masked), a real one the real keys up to it
    mask = (causal & real[:, None, :]) | torch.eye(seq, dtype=torch.bool, device=p.q.device)
    out = F.scaled_dot_product_attention(scatter(p.q), scatter(p.k), scatter(p.v), attn_mask=mask[:, None],
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(batch * seq, *p.q.shape[1:]).index_select(0, rows)


def nested(p: Packed) -> torch.Tensor:
    offsets = p.offsets
    groups = p.q.shape[1] // p.k.shape[1]

    def jagged(t: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)

    k, v = (t.repeat_interleave(groups, dim=1) for t in (p.k, p.v))  # no GQA for nested inputs
    out = F.scaled_dot_product_attention(jagged(p.q), jagged(k), jagged(v), is_causal=True)
    return out.transpose(1, 2).values()


_flex_kernel: Callable | None = None


def flex(p: Packed) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_kernel
    if _flex_kernel is None:
        _flex_kernel = torch.compile(flex_attention) if p.q.is_cuda else flex_attention
    total = p.q.shape[0]
    document = torch.repeat_interleave(torch.arange(len(p.lengths), device=p.q.device),
                                       torch.tensor(p.lengths, device=p.q.device))

    def same_request_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(same_request_causal, None, None, total, total, device=p.q.device)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (p.q, p.k, p.v))
    return _flex_kernel(q, k, v, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)


def flash_varlen(p: Packed) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = p.offsets.to(torch.int32)
    longest = max(p.lengths)
    return flash_attn_varlen_func(p.q, p.k, p.v, cu, cu, longest, longest, causal=True)


def torch_varlen(p: Packed) -> torch.Tensor:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    cu = p.offsets.to(torch.int32)
    longest = max(p.lengths)
    options = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in options else {"is_causal": True}  # the newer torch's name
    k, v = p.k, p.v
    if "enable_gqa" in options:
        causal["enable_gqa"] = True
    else:
        k, v = (t.repeat_interleave(p.q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(p.q, k, v, cu, cu, longest, longest, **causal)


METHODS: dict[str, Callable[[Packed], torch.Tensor]] = {
    "per-request": per_request, "padded": padded, "nested": nested, "flex": flex, "torch-varlen": torch_varlen,
    "flash-varlen": flash_varlen,
}


def time_ms(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(p: Packed, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    reference = per_request(p)
    rows = []
    for name, method in METHODS.items():
        row = {"method": name, "ms": None, "first_call_s": None, "max_abs_diff": None, "error": ""}
        try:
            start = time.perf_counter()
            out = method(p)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["first_call_s"] = round(time.perf_counter() - start, 3)
            row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
            for _ in range(warmup):
                method(p)
            row["ms"] = time_ms(lambda: method(p), device, repeats)
        except Exception as error:  # a method this torch / device / install does not offer
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, nargs="+", default=[8, 32])
    p.add_argument("--lengths", type=int, nargs="+", default=[128], help="mean lengths (default %(default)s)")
    p.add_argument("--spread", type=float, default=0.5, help="lengths uniform in [1 -+ spread] x mean")
    p.add_argument("--heads", type=int, nargs=2, default=[16, 8], metavar=("Q", "KV"),
                   help="query and key/value heads (default: Qwen3-0.6B's 16 8)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    add_out_dir(p, "varlen_attention")
    p.add_argument("--out-name", default="varlen_attention")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    announce_device(device)
    rows, failed = [], []
    for requests in args.requests:
        for mean in args.lengths:
            packed = make_packed(requests, mean, args.spread, *args.heads, args.dim, dtype, device)
            for row in measure(packed, device, args.warmup, args.repeats):
                rows.append({"requests": requests, "mean_len": mean, "real_tokens": sum(packed.lengths),
                             "padded_tokens": requests * max(packed.lengths), **row})
                if row["max_abs_diff"] is not None and row["max_abs_diff"] > TOLERANCE[dtype]:
                    failed.append(f"{row['method']} at {requests} x {mean}: max diff {row['max_abs_diff']:.3g}")
    notes = ("Each method on the same packed q/k/v (heads {} / {}, dim {}, {}); `max_abs_diff` against per-request "
             "causal SDPA; `ms` the median of the timed calls after the warm-up; `error`: the method is not available "
             "here.".format(*args.heads, args.dim, str(dtype).removeprefix("torch.")))
    caveat = None if device.type == "cuda" else f"NOT speed figures: on {device.type} this checks the methods agree"
    written = write_results(args.out_name, "Attention of a packed prefill, by method", rows, notes=notes,
                            out_dir=args.out_dir, caveat=caveat)
    for failure in failed:
        print(f"MISMATCH: {failure}")
    print_written(written)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

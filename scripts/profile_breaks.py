"""Where a bcg call spends its time: host µs per break and per graph segment, and the top GPU kernels.

    python scripts/profile_breaks.py --model qwen3-0.6b --requests 8 --length 128   # a multi-request prefill
    python scripts/profile_breaks.py --model qwen3-0.6b --decode                      # one decode step, bs 1

The break body's host time is the budget (see DESIGN.md): this script times every break and every CUDA graph
segment of one replay on the host, then lists the GPU kernels of eager and bcg side by side (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import bcg
from presets import build_model

_host_times: dict[str, list[float]] = defaultdict(list)


class _Timed:
    """Proxy for one replay segment: records its host time under ``label``."""

    def __init__(self, segment: Any, label: str) -> None:
        self.segment, self.label = segment, label

    def replay(self) -> None:
        start = time.perf_counter()
        self.segment.replay()
        _host_times[self.label].append(time.perf_counter() - start)

    def reset(self) -> None:
        self.segment.reset()


def instrument(handle: bcg.BcgHandle) -> None:
    for graph in handle.runner.graphs.values():
        segments = graph._graph._segments
        for i, segment in enumerate(segments):
            if not isinstance(segment, _Timed):
                label = "graph segment" if isinstance(segment, torch.cuda.CUDAGraph) else "break"
                segments[i] = _Timed(segment, label)


def batch(requests: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length * 3 // 2 + 1, (requests,), generator=generator)
    ids = torch.randint(3, vocab, (requests, int(lengths.max())), generator=generator)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths.tolist()):
        mask[row, : ids.shape[1] - n] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "position_ids": positions.cuda()}


def median_ms(fn, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def top_kernels(fn, label: str, rows: int = 12) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n== {label}: top GPU kernels ==")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--decode", action="store_true", help="profile generate(): bs 1, 256-token prompt, 32 new")
    args = parser.parse_args()

    model = build_model(args.model, torch.device("cuda"))
    vocab = model.config.vocab_size
    if args.decode:
        prompt = batch(1, 256, vocab)
        del prompt["position_ids"]

        def call() -> Any:  # 31 decode steps and one prefill: the breaks' medians are decode breaks
            return model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    else:
        inputs = batch(args.requests, args.length, vocab)

        def call() -> Any:
            return model(**inputs, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        eager_ms = median_ms(call)
        top_kernels(call, "eager")
        handle = bcg.wrap_model(model)
        call()
        instrument(handle)
        _host_times.clear()
        bcg_ms = median_ms(call)
        top_kernels(call, "bcg")
    print(f"\nmedian ms: eager {eager_ms:.2f}  bcg {bcg_ms:.2f}  stats {handle.stats()['rejects']} "
          f"replays {handle.stats()['replays']}")
    for label, times in _host_times.items():
        print(f"host {label}: {statistics.median(times) * 1e6:.1f} µs median over {len(times)}, "
              f"{sum(times) / 11 * 1e3:.2f} ms per call")


if __name__ == "__main__":
    main()

"""Where a bcg call spends its time: host µs per break and per graph segment, and the top GPU kernels.

    python scripts/profile_breaks.py --model qwen3-0.6b --requests 8 --length 128   # a multi-request prefill
    python scripts/profile_breaks.py --model qwen3-0.6b --requests 8 --length 128 --spread 0   # equal lengths
    python scripts/profile_breaks.py --model qwen3-0.6b --decode                      # generate(), bs 1
    python scripts/profile_breaks.py --model qwen3.5-like-2b --decode   # a hybrid: host µs per break by mixer type
    python scripts/profile_breaks.py --decode --decode-batch 32 --mode exact   # 32 left-padded prompts, eager's kernels
    python scripts/profile_breaks.py --decode --compile   # full-graph decode (the default) beside HF's compiled decode
    python scripts/profile_breaks.py --decode --breaks    # decode steps through the breaks (static_cache=False)

It prints to stdout; kept runs live in ``results/profile/`` (``... > results/profile/profile_<model>_<call>.txt``).

A break body's host time is what a small model's step is made of: this script times every break and every CUDA graph
segment of one replay on the host, then lists the GPU kernels of eager and bcg side by side (torch.profiler)
with the GPU busy time per call. ``--decode`` also times a plain forward loop (no generate()) to separate
generate()'s own per-step host time from the model's, and reports the host time of each patched stack call and of
its phases (with real graphs a replay returns before the GPU is done: what a call costs the host). ``--compile`` adds
HF's static cache + torch.compile (bench_decode's hf-compile) as a contender for ``generate``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import bcg
from bcg.hf import cache_argument
from bench_decode import make_generate, make_shape, release_compiled
from bench_prefill import make_batch
from benchutil import COMPILED
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


def time_stack_calls(handle: bcg.BcgHandle, profiler: cProfile.Profile | None = None) -> None:
    """Record the host time of every patched stack call (eligibility, masks, copies, replay launch, output); with
    ``profiler``, profile those calls only (their own host work, where a real replay only launches)."""
    runner = handle.runner
    forward_locked = runner._forward_locked

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            return forward_locked(*args)
        finally:
            if profiler is not None:
                profiler.disable()
            _host_times["stack call"].append(time.perf_counter() - start)

    runner._forward_locked = timed


def time_phases(handle: bcg.BcgHandle) -> None:
    """Record the host time of each phase of a patched stack call: the state check, the plan, and for decode steps on a
    stand-in the binding, the live context, the full graph's replay (copies, launch, output clone) and the settling of
    the caller's cache."""
    runner = handle.runner
    full = runner.full_graphs
    phases = [(runner, "_check_state", "check state"), (runner, "_plan", "plan"), (runner.contexts, "build", "context")]
    if full.stand_ins is not None:
        phases += [(full.stand_ins, "bind", "stand-in bind"), (full.stand_in_decoder, "replay", "full-graph replay"),
                   (full.stand_ins, "settle", "stand-in settle")]
    for owner, name, label in phases:
        original = getattr(owner, name)

        def timed(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _host_times[f"phase: {_label}"].append(time.perf_counter() - start)

        object.__setattr__(owner, name, timed)  # the live context builder is a frozen dataclass


def instrument(handle: bcg.BcgHandle) -> None:
    """Time every segment of every captured graph; breaks are labelled by the module they stand for (attention, or
    a hybrid model's mixer class), in the order the runner's slots record them."""
    runner = handle.runner
    for (key, _), graph in runner.table.graphs.items():
        slots = runner.segments.slots.get(key, [])
        segments = getattr(graph._graph, "_segments", None)
        if segments is None:  # the eager backend replays by running the stack: nothing to time per segment
            continue
        breaks = 0
        for i, segment in enumerate(segments):
            inner = segment.segment if isinstance(segment, _Timed) else segment
            if isinstance(inner, torch.cuda.CUDAGraph):
                label = "graph segment"
            else:
                slot = slots[breaks] if breaks < len(slots) else None
                breaks += 1
                label = f"break: {type(slot.module).__name__}" if slot is not None else "break"
            segments[i] = _Timed(inner, label)


def batch(requests: int, length: int, spread: float, vocab: int) -> dict[str, torch.Tensor]:
    """bench_prefill's inputs for one point (same seed, so the figures line up with its tables)."""
    b = make_batch(requests, length, spread, vocab, pad=0, seed=0, device=torch.device("cuda"))
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids}


def forward_loop(model: torch.nn.Module, prompt: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decode by plain forward calls: what a step costs without generate()'s own host work."""
    cache = {cache_argument(model.forward): DynamicCache(config=model.config)}
    logits = model(**prompt, **cache, use_cache=True, logits_to_keep=1).logits
    mask = prompt["attention_mask"]
    tokens = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        logits = model(input_ids=token, attention_mask=mask, **cache, use_cache=True).logits
    return torch.cat(tokens, dim=1)


def median_ms(fn, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def top_kernels(fn, label: str, rows: int = 12) -> float:
    """Print the top GPU kernels of one call; return its GPU busy time (sum of kernel times) in ms."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n== {label}: top GPU kernels ==")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # ops would count their kernels twice
    return sum(e.device_time_total for e in kernels) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--spread", type=float, default=0.5, help="as bench_prefill's --spread")
    parser.add_argument("--decode", action="store_true",
                        help="profile generate(): --decode-batch prompts of ~256 tokens (--spread), 32 new tokens")
    parser.add_argument("--decode-batch", type=int, default=1,
                        help="prompts per generate() call with --decode (default %(default)s; above 1 the prompts are "
                             "left-padded to seeded lengths as --spread says)")
    parser.add_argument("--mode", choices=("fast", "exact"), default="fast", help="bcg's mode (default %(default)s)")
    parser.add_argument("--breaks", action="store_true",
                        help="wrap with static_cache=False (decode steps through the breaks, not full graphs)")
    parser.add_argument("--compile", action="store_true",
                        help="with --decode: also profile HF's static cache + torch.compile generate() (a compile "
                             "of ~40 s first)")
    parser.add_argument("--host-profile", action="store_true",
                        help="also profile bcg's stack calls with cProfile (slows them: their timings are then "
                             "not the figures to quote) and list the functions with the most own host time")
    args = parser.parse_args()

    model = build_model(args.model, torch.device("cuda"))
    vocab = model.config.vocab_size
    calls = {}
    if args.decode:
        prompt = batch(args.decode_batch, 256, args.spread if args.decode_batch > 1 else 0.0, vocab)
        del prompt["position_ids"]
        steps = 32
        # 31 decode steps and one prefill each: the breaks' medians are decode breaks
        calls["generate"] = partial(model.generate, **prompt, max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, pad_token_id=0)
        calls["forward loop"] = partial(forward_loop, model, prompt, steps)
    else:
        steps = 1
        calls["prefill"] = partial(model, **batch(args.requests, args.length, args.spread, vocab), use_cache=True,
                                   logits_to_keep=1)

    rows = []
    with torch.no_grad():
        eager = {name: (median_ms(call), top_kernels(call, f"eager {name}")) for name, call in calls.items()}
        if args.decode and args.compile:
            shape = make_shape(args.decode_batch, 256, vocab, 0, args.spread if args.decode_batch > 1 else 0.0, 0,
                               model.device)
            compiled = partial(make_generate(COMPILED, model, shape, steps), steps)
            compiled()  # the compile
            eager["hf-compile"] = (median_ms(compiled), top_kernels(compiled, "hf-compile generate"))
            print(f"\nhf-compile generate: {eager['hf-compile'][0]:.2f} ms per call, GPU busy "
                  f"{eager['hf-compile'][1]:.2f} ms (/{steps} steps)")
            release_compiled(model, model.device)
        handle = bcg.wrap_model(model, mode=args.mode, static_cache=False if args.breaks else None)
        for call in calls.values():
            call()
        instrument(handle)
        time_stack_calls(handle)
        time_phases(handle)
        host_profile = None
        _host_times.clear()
        for name, call in calls.items():
            bcg_ms = median_ms(call)
            timed_calls = {label: list(times) for label, times in _host_times.items()}  # the profiler slows the host
            timed_calls[f"stack call ({name})"] = timed_calls.pop("stack call")
            bcg_gpu = top_kernels(call, f"bcg {name}")
            _host_times.clear()
            _host_times.update(timed_calls)
            rows.append((name, *eager[name], bcg_ms, bcg_gpu))
        if args.host_profile:
            host_profile = cProfile.Profile()
            time_stack_calls(handle, host_profile)
            calls[next(iter(calls))]()
            _host_times.pop("stack call")  # slowed by the profiler
    print(f"\nbcg rejects {handle.stats()['rejects']}, replays {handle.stats()['replays']}")
    header = f"{'call':<14}{'eager ms':>10}{'eager GPU ms':>14}{'bcg ms':>10}{'bcg GPU ms':>12}"
    print(f"{header}   (per call; /{steps} steps)")
    for name, *figures in rows:
        print(f"{name:<14}" + "".join(f"{f:>{w}.2f}" for f, w in zip(figures, (10, 14, 10, 12))))
    for label, times in _host_times.items():
        print(f"host {label}: {statistics.median(times) * 1e6:.1f} µs median over {len(times)}")
    if host_profile is not None:
        print(f"\n== bcg's stack calls of one {next(iter(calls))} under cProfile: most own host time ==")
        pstats.Stats(host_profile).sort_stats("tottime").print_stats(30)
        pstats.Stats(host_profile).sort_stats("cumulative").print_stats("bcg", 30)


if __name__ == "__main__":
    main()

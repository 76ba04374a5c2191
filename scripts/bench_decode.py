"""Decode throughput of ``generate()``: eager, HF's static cache + torch.compile, and bcg, at a fixed token count.

Every contender generates exactly ``--new-tokens`` greedy tokens (min = max new tokens, EOS disabled) from the same
random prompts. Per-token time = (t(generate N) - t(generate 1)) / (N - 1), so the prefill cancels out. Beside
every figure: the physical floor, the bytes one decode step must read (weights; weights + KV cache) over the HBM
bandwidth measured here with a large device-to-device copy.

    python scripts/bench_decode.py                                   # qwen3-0.6b, batch 1 and 32, context 1024
                                                                     # no GPU: the quick check (tiny, small grid)
    python scripts/bench_decode.py --batches 1 8 32 --contexts 256 1024    # full grid: 6 compiles, ~8 min
    python scripts/bench_decode.py --model llama-3.1-8b --skip-compile
    python scripts/bench_decode.py --model qwen3-8b --batches 1 8 --contexts 256 --skip-compile --exact
    python scripts/bench_decode.py --breaks                # + bcg with static_cache=False (decode through the breaks)
    python scripts/bench_decode.py --batches 32 --contexts 128 --spread 0.5 --new-tokens 128 --skip-compile
                                                           # 32 requests of 64..192 tokens: multi-request generation
    python scripts/bench_decode.py --model tiny --batches 1 2 --contexts 16 --new-tokens 4 --out-dir /tmp/bench

Writes ``results/decode/decode_<model>.{json,md,png}`` (``--out-dir``, ``--out-name``) and ends by naming them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm
from transformers import CompileConfig, PreTrainedModel, StaticCache

import bcg
from bcg.hf import cache_argument
from benchutil import (
    COMPILED,
    EAGER,
    Bench,
    Contender,
    Series,
    StatsDelta,
    bench_parser,
    check,
    contenders,
    device_tag,
    expected_stats,
    format_rejects,
    hbm_bandwidth,
    peak_memory_mib,
    point_generator,
    reset_peak_memory,
    save_plot,
    snapshot,
    speed_columns,
    stats_since,
    timed,
)
from bench_prefill import make_batch
from presets import decode_weight_bytes, kv_bytes_per_token, pad_token_id

# Two shapes, so two compiles of HF's peer (~40 s each): the default run stays within ~4 minutes on qwen3-0.6b.
# Without a GPU and --model, the quick check: seconds on 2 CPU cores.
FULL = {"batches": [1, 32], "contexts": [1024], "new_tokens": 128, "repeats": 3}
QUICK = {"batches": [1, 2], "contexts": [16], "new_tokens": 8, "repeats": 2}
GRID = {"batches": "prompts per call", "contexts": "prompt lengths", "new_tokens": "tokens generated per call (>= 2)",
        "repeats": "timed generate(N) / generate(1) pairs per shape"}
# HF's default CompileConfig, spelled out: what generate() uses when a static cache makes it auto-compile.
COMPILE_CONFIG = CompileConfig(fullgraph=False, mode="reduce-overhead")

Generate = Callable[[int], torch.Tensor]


@dataclass
class Shape:
    """``batch`` prompts of ``context`` random tokens on average: all that long (no padding), or with ``--spread``
    of seeded lengths, left-padded as HF users batch them."""

    batch: int
    context: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def key(self) -> tuple[int, int]:
        return self.batch, self.context

    @property
    def padded_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Measurement:
    """One contender on one shape."""

    first_s: float  # the first generate(N) call: bcg's captures or HF's compile included
    n_s: float  # median generate(N)
    one_s: float  # median generate(1)
    tokens: torch.Tensor  # the N generated tokens of the first call, on CPU
    peak_mib: float | None
    stats: StatsDelta | None  # bcg: the timed calls
    dynamo_graphs: int  # graphs torch.compile built for this shape (0: an earlier shape's graph was reused)
    kernels_per_step: float | None  # GPU kernels a decode step runs (None on CPU)
    compiled: bool = False  # generate() took HF's compiled forward

    def per_token_ms(self, new_tokens: int) -> float:
        return (self.n_s - self.one_s) / (new_tokens - 1) * 1e3


def make_shape(batch: int, context: int, vocab: int, seed: int, spread: float, pad: int,
               device: torch.device) -> Shape:
    if spread == 0:
        ids = torch.randint(0, vocab, (batch, context), generator=point_generator(seed, batch, context)).to(device)
        return Shape(batch, context, ids, torch.ones_like(ids))
    prompts = make_batch(batch, context, spread, vocab, pad, seed, device)  # bench_prefill's requests
    return Shape(batch, context, prompts.input_ids, prompts.attention_mask)


def make_generate(contender: Contender, model: PreTrainedModel, shape: Shape, new_tokens: int) -> Generate:
    """``generate(n)``: n greedy tokens, never stopping early, with the contender's cache."""
    kwargs: dict[str, Any] = {
        "attention_mask": shape.attention_mask, "do_sample": False, "eos_token_id": None,
        "pad_token_id": pad_token_id(model.config), **contender.generate,
    }
    cache = None
    if contender is COMPILED:
        # One StaticCache per shape, reset in place between calls. cache_implementation="static" would make a
        # fresh cache per call, and torch re-records CUDA graphs whenever a static-address input moves.
        cache = StaticCache(config=model.config, max_cache_len=shape.padded_length + new_tokens)
        kwargs[cache_argument(model.forward)] = cache
        if model.device.type == "cuda":  # HF compiles on accelerators only (it warns when asked on CPU)
            kwargs["compile_config"] = COMPILE_CONFIG

    def generate(n: int) -> torch.Tensor:
        if cache is not None:
            cache.reset()
        output = model.generate(shape.input_ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return output[:, shape.padded_length:]

    return generate


def dynamo_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def measure(generate: Generate, new_tokens: int, repeats: int, device: torch.device,
            handle: bcg.BcgHandle | None) -> Measurement:
    reset_peak_memory(device)
    graphs_before = dynamo_graphs()
    first_s, tokens = timed(partial(generate, new_tokens), device)
    before = snapshot(handle)
    n_times, one_times = [], []
    for _ in range(repeats):  # interleaved, so a drifting clock or temperature hits both alike
        n_times.append(timed(partial(generate, new_tokens), device)[0])
        one_times.append(timed(partial(generate, 1), device)[0])
    return Measurement(first_s, statistics.median(n_times), statistics.median(one_times), tokens.cpu(),
                       peak_memory_mib(device), stats_since(handle, before), dynamo_graphs() - graphs_before,
                       kernels_per_step(generate, new_tokens, device))


def kernels_per_step(generate: Generate, new_tokens: int, device: torch.device) -> float | None:
    """GPU kernels one decode step runs, those inside graph replays included (copies and fills not counted):
    (kernels of generate(N) - kernels of generate(1)) / (N - 1), so the prefill cancels out. After the timed calls:
    the profiler slows the host."""
    if device.type != "cuda":
        return None

    def kernels(n: int) -> int:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(n)
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))

    return (kernels(new_tokens) - kernels(1)) / (new_tokens - 1)


def run_contender(contender: Contender, handle: bcg.BcgHandle | None, model: PreTrainedModel, shapes: list[Shape],
                  args: argparse.Namespace, device: torch.device) -> dict[tuple[int, int], Measurement]:
    results = {}
    for shape in tqdm(shapes, desc=contender.name, leave=False):
        generate = make_generate(contender, model, shape, args.new_tokens)
        results[shape.key] = measure(generate, args.new_tokens, args.repeats, device, handle)
        # generate() sets _compiled_call only when it chooses its compiled forward (the unwrapped model, static cache).
        results[shape.key].compiled = hasattr(model, "_compiled_call")
    if contender is COMPILED:
        release_compiled(model, device)
    return results


def release_compiled(model: PreTrainedModel, device: torch.device) -> None:
    """Drop HF's compiled forward and its CUDA graphs before bcg runs, so neither holds the other's memory."""
    for attribute in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Floors:
    """Bytes one decode step must read, and the bandwidth they are read at."""

    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float | None  # bytes/s; None on CPU

    def ms(self, shape: Shape, new_tokens: int, with_kv: bool) -> float | None:
        if self.bandwidth is None:
            return None
        cached = shape.real_tokens + shape.batch * new_tokens / 2  # mean cache length over the generation
        total = self.weight_bytes + (cached * self.kv_bytes_per_token if with_kv else 0)
        return total / self.bandwidth * 1e3


def decode_check(contender: Contender, measurement: Measurement, same_tokens: float, shape: Shape,
                 args: argparse.Namespace, device: torch.device) -> str:
    """bcg: every decode step replays and the prefill replays unless it exceeds max_num_tokens; HF: it compiled."""
    if contender is COMPILED:
        return "ok" if device.type != "cuda" or measurement.compiled else "NOT COMPILED"
    if measurement.stats is None:  # not bcg
        return "ok"
    # one prefill per generate(N) and one per generate(1)
    expected = expected_stats(shape.real_tokens, 2 * args.repeats, args.max_num_tokens,
                              steps=args.repeats * (args.new_tokens - 1))
    return check(measurement.stats, expected, same_tokens == 1.0, device)


def make_row(contender: Contender, shape: Shape, results: dict[str, dict], floors: Floors,
             args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    m = results[contender.name][shape.key]
    ms = m.per_token_ms(args.new_tokens)
    eager = results[EAGER.name][shape.key]
    floor_kv = floors.ms(shape, args.new_tokens, with_kv=True)
    same_tokens = (m.tokens == eager.tokens).float().mean().item()
    return {
        "batch": shape.batch,
        "context": shape.context,
        "contender": contender.name,
        "ms_per_token": ms,
        "tok_s": shape.batch / ms * 1e3,
        **speed_columns(device, speedup=eager.per_token_ms(args.new_tokens) / ms),
        "floor_w_ms": floors.ms(shape, args.new_tokens, with_kv=False),
        "floor_wkv_ms": floor_kv,
        "of_floor": floor_kv / ms if floor_kv is not None else None,
        "first_call_s": m.first_s,
        "gen_n_s": m.n_s,
        "gen_1_s": m.one_s,
        "peak_mib": m.peak_mib,
        "same_tokens": same_tokens,
        "replays": m.stats.replays if m.stats else None,
        "rejects": format_rejects(m.stats.rejects) if m.stats else None,
        "dynamo_graphs": m.dynamo_graphs if contender is COMPILED else None,
        "kernels_per_step": m.kernels_per_step,
        "check": decode_check(contender, m, same_tokens, shape, args, device),
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str, ran: list[Contender]) -> Path | None:
    """ms per step against batch: a colour per contender, a line style per context, the floor in black."""
    colors = {contender.name: contender.color for contender in ran}
    series = []
    for context, line in zip(sorted({r["context"] for r in rows}), ("-", "--", ":", "-.") * 4):
        at = [r for r in rows if r["context"] == context]
        for contender in dict.fromkeys(r["contender"] for r in at):
            points = [(r["batch"], r["ms_per_token"]) for r in at if r["contender"] == contender]
            series.append(Series(f"{contender}, ctx {context}", *zip(*points), style="o" + line,
                                 color=colors[contender]))
        floor = [(r["batch"], r["floor_wkv_ms"]) for r in at if r["contender"] == EAGER.name and r["floor_wkv_ms"]]
        if floor:
            series.append(Series(f"floor (weights + KV), ctx {context}", *zip(*floor), style="x" + line,
                                 color="black"))
    return save_plot(path, series, "batch", "ms per decode step", title, logy=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "decode", FULL, QUICK, GRID)
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out HF's static cache + torch.compile peer (~40 s of compile per shape)")
    parser.add_argument("--breaks", action="store_true",
                        help="also measure bcg-breaks: wrapped with static_cache=False (decode steps through the "
                             "breaks on generate()'s own cache)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="prompt lengths uniform in [1 - spread, 1 + spread] x context, left-padded "
                             "(bench_prefill's requests); default 0: every prompt exactly --contexts long, no padding")
    args = parser.parse_args(argv)
    if not 0 <= args.spread < 1:
        parser.error(f"--spread must be in [0, 1), got {args.spread}")
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (per-token time subtracts generate(1))")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench.start(args, FULL, QUICK)
    model, device = bench.model, bench.device
    floors = Floors(decode_weight_bytes(model), kv_bytes_per_token(model.config, model.dtype), hbm_bandwidth(device))
    vocab = model.config.get_text_config(decoder=True).vocab_size
    pad = pad_token_id(model.config)
    shapes = [make_shape(b, c, vocab, args.seed, args.spread, pad, device) for c in args.contexts for b in args.batches]
    ran = contenders(exact=args.exact, compiled=not args.skip_compile, breaks=args.breaks)
    if COMPILED in ran and device.type != "cuda":
        print(f"{COMPILED.name} on {device.type}: static cache only, HF's generate() compiles on accelerators only")

    results = bench.run(ran, partial(run_contender, model=model, shapes=shapes, args=args, device=device))
    rows = [make_row(c, s, results, floors, args, device) for s in shapes for c in ran]
    title = f"Decode, {bench.name}: {args.new_tokens} new tokens ({device_tag(device)})"
    settings = {"new_tokens": args.new_tokens, "repeats": args.repeats, "spread": args.spread,
                "compile_config": COMPILE_CONFIG.to_dict() if COMPILED in ran else None}
    bandwidth_gb_s = floors.bandwidth / 1e9 if floors.bandwidth else None
    extra = {"floors": {"decode_weight_bytes": floors.weight_bytes, "kv_bytes_per_token": floors.kv_bytes_per_token,
                        "hbm_bandwidth_gb_s": bandwidth_gb_s}}
    return bench.finish("decode", title, rows, ("contender", "batch", "context"), settings, NOTES,
                        partial(plot, rows, title=title, ran=ran), extra=extra)


NOTES = """\
`generate(input_ids, attention_mask, do_sample=False, min_new_tokens=N, max_new_tokens=N, eos_token_id=None)`.
With `--spread` > 0 the prompts have seeded lengths uniform in [1 - spread, 1 + spread] x context (context: their
mean), left-padded with a mask, as bench_prefill's requests; tok_s counts generated tokens of all of them.
eager: HF's default DynamicCache. hf-compile: a StaticCache (max_cache_len = context + N, made once per shape and
reset in place between calls) passed as the cache argument, with which generate() auto-compiles its decode forward
(CompileConfig(mode="reduce-overhead", fullgraph=False), HF's default; the prefill is not compiled); run on the
unwrapped model before bcg. bcg: `bcg.wrap_model` (defaults: mode="fast", lazy capture) with the default DynamicCache:
every decode step replays as one graph on bcg's static stand-in for generate()'s dynamic cache, no breaks;
bcg-breaks (`--breaks`): wrapped again with `static_cache=False` (decode steps take the breaks on the dynamic cache);
bcg-exact (`--exact`): wrapped again with `mode="exact"` (eager's kernels, the breaks).
ms_per_token = (median t(generate N) - median t(generate 1)) / (N - 1); tok_s = batch / ms_per_token.
floor_w_ms: decode weight bytes (untied input embeddings excluded; every MoE expert counted) / HBM bandwidth;
floor_wkv_ms adds the KV cache at its mean length; of_floor = floor_wkv_ms / ms_per_token.
first_call_s: the first generate(N) per shape, captures or compile included; peak_mib: peak allocated GPU memory
over the shape's calls, that first one included. same_tokens: fraction of generated
tokens equal to eager's (bf16 on random weights: near-ties flip greedy choices, and one flip changes the rest of
that sequence). replays/rejects: bcg over the timed calls. hf-compile's `check` is ok when generate() took its
compiled forward (on a GPU; elsewhere it does not compile).
"""

if __name__ == "__main__":
    sys.exit(main())

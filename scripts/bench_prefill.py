"""Multi-request prefill: eager vs bcg on the same left-padded batches, at equal outputs.

R requests of seeded lengths (uniform in [1 - spread, 1 + spread] x the mean, spread 0.5 by default; 0 gives
every request exactly the mean length) are left-padded to the longest with an attention
mask, as HF users batch them. Each call is one prefill as ``generate()`` runs it: a fresh DynamicCache,
positions from the mask, and ``logits_to_keep=1`` (generate's prefill computes logits for the last token only).

    python scripts/bench_prefill.py                                  # qwen3-0.6b, 5 x 4 grid (~2 min on an H100)
                                                                     # no GPU: the quick check (tiny, 2 x 2 grid)
    python scripts/bench_prefill.py --max-num-tokens 32768                # capture every point (default: 4096)
    python scripts/bench_prefill.py --model qwen3-8b --requests 1 8 32 --lengths 128 512
    python scripts/bench_prefill.py --requests 8 --lengths 128 --spread 0            # 8 requests of exactly 128
    python scripts/bench_prefill.py --requests 8 --lengths 128 --spread 0 --fused-kernels  # + fused kernels
    python scripts/bench_prefill.py --model tiny --requests 1 4 --lengths 16 --out-dir /tmp/bench   # CPU check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import bcg
from bcg.buckets import default_capture_sizes, pick_bucket
from benchutil import (
    FUSED_HELP,
    MIB,
    Series,
    StatsDelta,
    add_common_arguments,
    announce_device,
    device_tag,
    format_rejects,
    grid_help,
    median_seconds,
    output_stem,
    peak_memory_mib,
    pick_device,
    reset_peak_memory,
    resolve_defaults,
    save_plot,
    snapshot,
    speed_caveat,
    speed_columns,
    stats_since,
    timed,
    wrap_options,
)
from presets import build_model, describe, pad_token_id
from report import write_results

# The grid on a GPU (or with --model), and the quick check that runs without either: seconds on 2 CPU cores.
FULL = {"requests": [1, 4, 8, 16, 32], "lengths": [64, 128, 256, 512], "warmup": 3, "repeats": 10}
QUICK = {"requests": [1, 4], "lengths": [16, 64], "warmup": 2, "repeats": 3}


@dataclass
class Batch:
    """One prefill call's inputs: ``requests`` prompts left-padded to the longest."""

    requests: int
    mean_length: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def key(self) -> tuple[int, int]:
        return self.requests, self.mean_length

    @property
    def tokens(self) -> int:
        """Tokens per call, padding included: what the stack (and bcg's bucket) sees."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Measurement:
    """One contender on one batch."""

    first_s: float
    ms: float
    logits: torch.Tensor  # last-token logits of the last timed call, on CPU
    peak_mib: float | None
    first: StatsDelta | None = None  # bcg: the first call (captures)
    timed: StatsDelta | None = None  # bcg: warm-up + timed calls


def make_batch(requests: int, mean_length: int, spread: float, vocab: int, pad: int, seed: int,
               device: torch.device) -> Batch:
    # Seeded per point, so restricting the grid keeps every remaining point's inputs unchanged.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + requests * 1009 + mean_length)
    low, high = max(1, round((1 - spread) * mean_length)), max(1, round((1 + spread) * mean_length))
    lengths = torch.randint(low, high + 1, (requests,), generator=generator)
    seq = int(lengths.max())
    ids = torch.randint(0, vocab, (requests, seq), generator=generator)
    mask = (torch.arange(seq) >= seq - lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    # generate()'s own positions for a left-padded batch: count real tokens, pads at 0.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return Batch(requests, mean_length, ids.to(device), mask.to(device), positions.to(device))


def prefill(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """One prefill; returns the last-token logits."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=True, logits_to_keep=1)
    return output.logits[:, -1]


def run_contender(name: str, model: torch.nn.Module, batches: list[Batch], device: torch.device, warmup: int,
                  repeats: int, handle: bcg.BcgHandle | None = None) -> dict[tuple[int, int], Measurement]:
    """First calls largest first (bcg captures them so, the way ``lazy=False`` would), then the timed calls."""
    firsts: dict[tuple[int, int], tuple[float, StatsDelta | None]] = {}
    for batch in tqdm(sorted(batches, key=lambda b: -b.tokens), desc=f"{name}: first calls", leave=False):
        before = snapshot(handle)
        seconds, _ = timed(partial(prefill, model, batch), device)
        firsts[batch.key] = seconds, stats_since(handle, before)

    results = {}
    for batch in tqdm(batches, desc=f"{name}: timed", leave=False):
        before = snapshot(handle)
        reset_peak_memory(device)
        for _ in range(warmup - 1):
            prefill(model, batch)
        ms, logits = median_seconds(partial(prefill, model, batch), device, repeats)
        first_s, first = firsts[batch.key]
        results[batch.key] = Measurement(first_s, ms * 1e3, logits.cpu(), peak_memory_mib(device), first,
                                         stats_since(handle, before))
    return results


def expected_stats(batch: Batch, calls: int, max_num_tokens: int) -> tuple[int, dict[str, int]]:
    """Replays and rejects bcg must show: every call replays inside the captured range, none beyond it."""
    if batch.tokens <= max_num_tokens:
        return calls, {}
    return 0, {"too_many_tokens": calls}


def compare(eager: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Max abs difference and argmax agreement of two [R, vocab] logit blocks."""
    diff = (eager.float() - other.float()).abs().max().item()
    agree = (eager.argmax(-1) == other.argmax(-1)).float().mean().item()
    return diff, agree


def make_row(batch: Batch, eager: Measurement, graphs: Measurement, args: argparse.Namespace, device: torch.device,
             fused: Measurement | None = None) -> dict[str, Any]:
    calls = max(args.warmup - 1, 0) + args.repeats
    expected = expected_stats(batch, calls, args.max_num_tokens)
    ok = all((m.timed.replays, m.timed.rejects) == expected for m in (graphs, fused) if m is not None)
    diff, agree = compare(eager.logits, graphs.logits)
    bucket = pick_bucket(default_capture_sizes(args.max_num_tokens), batch.tokens)
    return {
        "requests": batch.requests,
        "mean_len": batch.mean_length,
        "tokens": batch.tokens,
        "real_tokens": batch.real_tokens,
        "bucket": bucket if bucket is not None else "eager",
        "eager_ms": eager.ms,
        "bcg_ms": graphs.ms,
        **speed_columns(device, speedup=eager.ms / graphs.ms),
        "eager_tok_s": batch.real_tokens / eager.ms * 1e3,
        "bcg_tok_s": batch.real_tokens / graphs.ms * 1e3,
        "bcg_first_s": graphs.first_s,
        "capture_s": graphs.first.capture_seconds,
        "graph_mib": graphs.first.graph_bytes / MIB,
        "eager_peak_mib": eager.peak_mib,
        "bcg_peak_mib": graphs.peak_mib,
        "replays": f"{graphs.timed.replays}/{calls}",
        "rejects": format_rejects(graphs.timed.rejects),
        "max_abs_diff": diff,
        "argmax_agree": agree,
        **(fused_columns(eager, fused, device) if fused is not None else {}),
        "check": "ok" if ok else "UNEXPECTED",
    }


def fused_columns(eager: Measurement, fused: Measurement, device: torch.device) -> dict[str, Any]:
    """bcg with fused_kernels=True beside the plain figures: time, speedup, and its logits against eager's."""
    diff, agree = compare(eager.logits, fused.logits)
    return {"fused_ms": fused.ms, **speed_columns(device, fused_speedup=eager.ms / fused.ms),
            "fused_capture_s": fused.first.capture_seconds, "fused_max_abs_diff": diff, "fused_argmax_agree": agree}


def plot(rows: list[dict[str, Any]], path: Path, title: str, max_num_tokens: int) -> None:
    series = []
    for key, label, style in (("bcg_ms", "", "o-"), ("fused_ms", ", fused", "s--")):
        for index, requests in enumerate(sorted({r["requests"] for r in rows if key in r})):
            points = sorted((r["tokens"], r["eager_ms"] / r[key]) for r in rows if r["requests"] == requests)
            series.append(Series(f"R={requests}{label}", [p[0] for p in points], [p[1] for p in points],
                                 style=style, color=f"C{index}"))
    save_plot(path, series, "tokens per call (padded)", "speedup over eager (x)", title, hline=1.0,
              vline=(max_num_tokens, "bcg max_num_tokens"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--requests", type=int, nargs="+",
                        help="requests per call (R); " + grid_help("requests", FULL, QUICK))
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="mean prompt lengths; " + grid_help("lengths", FULL, QUICK))
    parser.add_argument("--spread", type=float, default=0.5,
                        help="lengths uniform in [1 - spread, 1 + spread] x mean; 0: all equal (default %(default)s)")
    parser.add_argument("--fused-kernels", action="store_true", help=FUSED_HELP)
    parser.add_argument("--warmup", type=int,
                        help="untimed calls per point, the capturing one included; " + grid_help("warmup", FULL, QUICK))
    parser.add_argument("--repeats", type=int,
                        help="timed calls per point (median reported); " + grid_help("repeats", FULL, QUICK))
    args = parser.parse_args(argv)
    if not 0 <= args.spread < 1:
        parser.error(f"--spread must be in [0, 1), got {args.spread}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    announce_device(device)
    name = resolve_defaults(args, device, FULL, QUICK)
    model = build_model(name, device, seed=args.seed)
    vocab, pad = model.config.get_text_config(decoder=True).vocab_size, pad_token_id(model.config)
    batches = [make_batch(r, n, args.spread, vocab, pad, args.seed, device)
               for r in args.requests for n in args.lengths]

    with torch.no_grad():
        eager = run_contender("eager", model, batches, device, args.warmup, args.repeats)
        measured, final = {}, {}
        for label in ("bcg", "bcg-fused") if args.fused_kernels else ("bcg",):
            handle = bcg.wrap_model(model, fused_kernels=label == "bcg-fused", **wrap_options(args, device))
            measured[label] = run_contender(label, model, batches, device, args.warmup, args.repeats, handle)
            final[label] = handle.stats()
            bcg.unwrap_model(model)
    graphs, fused = measured["bcg"], measured.get("bcg-fused", {})

    rows = [make_row(b, eager[b.key], graphs[b.key], args, device, fused.get(b.key)) for b in batches]
    flagged = [r for r in rows if r["check"] != "ok"]
    title = f"Prefill, {name}: eager vs bcg{' (and fused kernels)' if fused else ''} ({device_tag(device)})"
    stem = output_stem(args, "prefill", name)
    plot(rows, args.out_dir / f"{stem}.png", title, args.max_num_tokens)
    extra = {
        "model": describe(name, model),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "spread": args.spread,
                     "max_num_tokens": args.max_num_tokens, "backend": final["bcg"]["backend"], "logits_to_keep": 1},
        "bcg_final_stats": final,
    }
    for row in flagged:
        print(f"UNEXPECTED bcg stats at R={row['requests']} len={row['mean_len']}: replays {row['replays']}, "
              f"rejects {row['rejects']}")
    write_results(stem, title, rows, extra, notes=NOTES, out_dir=args.out_dir, caveat=speed_caveat(device))
    return 1 if flagged else 0


NOTES = """\
Each call: `model(input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=1)`, a left-padded
batch with positions from the mask and a fresh DynamicCache, as `generate()` runs its prefill (last-token logits
only). Eager runs first on the unwrapped model, then `bcg.wrap_model` and the same inputs (with `--fused-kernels`,
then unwrapped and wrapped again with `fused_kernels=True` for the `fused_*` columns). Times: median of the
timed calls after the warm-up calls (the first of which captures bcg's bucket, largest batches first), wall clock
between device synchronisations. tok/s counts real (non-pad) tokens. `replays`/`rejects`: bcg's counters over the
warm-up + timed calls after the capturing one; `check` is ok when every call replays (tokens <= max_num_tokens) or
every call is rejected as too_many_tokens (beyond it, by design). `graph_mib`: graph-pool memory the point's capture
added (stats graph_bytes); `*_peak_mib`: peak allocated GPU memory over the warm-up + timed calls (graph pools
count only for their live blocks); `max_abs_diff`/`argmax_agree`: bcg's last-token logits against eager's.
"""

if __name__ == "__main__":
    sys.exit(main())

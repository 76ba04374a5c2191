"""Multi-request prefill: eager vs bcg on the same left-padded batches, at equal outputs.

R requests of seeded lengths (uniform in [1 - spread, 1 + spread] x the mean, spread 0.5 by default; 0 gives
every request exactly the mean length) are left-padded to the longest with an attention
mask, as HF users batch them. Each call is one prefill as ``generate()`` runs it: a fresh DynamicCache,
positions from the mask, and ``logits_to_keep=1`` (generate's prefill computes logits for the last token only).

    python scripts/bench_prefill.py                                  # qwen3-0.6b, 5 x 4 grid (~2 min on an H100)
                                                                     # no GPU: the quick check (tiny, 2 x 2 grid)
    python scripts/bench_prefill.py --max-num-tokens 32768                # capture every point (default: 8192)
    python scripts/bench_prefill.py --model qwen3-8b --requests 1 8 32 --lengths 128 512
    python scripts/bench_prefill.py --requests 8 --lengths 128 --spread 0            # 8 requests of exactly 128
    python scripts/bench_prefill.py --requests 8 --lengths 128 --spread 0 --exact  # + mode="exact"
    python scripts/bench_prefill.py --model tiny --requests 1 4 --lengths 16 --out-dir /tmp/bench   # CPU check

Writes ``results/prefill/prefill_<model>.{json,md,png}`` (``--out-dir``, ``--out-name``) and ends by naming them.
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
    BCG,
    BCG_EXACT,
    EAGER,
    MIB,
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
    median_seconds,
    peak_memory_mib,
    point_generator,
    reset_peak_memory,
    save_plot,
    snapshot,
    speed_columns,
    stats_since,
    timed,
)
from presets import pad_token_id

# The grid on a GPU (or with --model), and the quick check that runs without either: seconds on 2 CPU cores.
FULL = {"requests": [1, 4, 8, 16, 32], "lengths": [64, 128, 256, 512], "warmup": 3, "repeats": 10}
QUICK = {"requests": [1, 4], "lengths": [16, 64], "warmup": 2, "repeats": 3}
GRID = {"requests": "requests per call (R)", "lengths": "mean prompt lengths",
        "warmup": "untimed calls per point, the capturing one included",
        "repeats": "timed calls per point (median reported)"}


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
        """Tokens per call, padding included: what the eager stack computes."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        """Tokens without padding: what bcg's graph segments compute (it packs a padded call) and buckets by."""
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
    generator = point_generator(seed, requests, mean_length)
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


def run_contender(contender: Contender, handle: bcg.BcgHandle | None, model: torch.nn.Module, batches: list[Batch],
                  device: torch.device, warmup: int, repeats: int) -> dict[tuple[int, int], Measurement]:
    """First calls largest first (bcg captures them so, the way ``lazy=False`` would), then the timed calls."""
    firsts: dict[tuple[int, int], tuple[float, StatsDelta | None]] = {}
    for batch in tqdm(sorted(batches, key=lambda b: -b.tokens), desc=f"{contender.name}: first calls", leave=False):
        before = snapshot(handle)
        seconds, _ = timed(partial(prefill, model, batch), device)
        firsts[batch.key] = seconds, stats_since(handle, before)

    results = {}
    for batch in tqdm(batches, desc=f"{contender.name}: timed", leave=False):
        before = snapshot(handle)
        reset_peak_memory(device)
        for _ in range(warmup - 1):
            prefill(model, batch)
        ms, logits = median_seconds(partial(prefill, model, batch), device, repeats)
        first_s, first = firsts[batch.key]
        results[batch.key] = Measurement(first_s, ms * 1e3, logits.cpu(), peak_memory_mib(device), first,
                                         stats_since(handle, before))
    return results


ROUNDING = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-2}


def _matches(logits: torch.Tensor, eager: torch.Tensor, exactly: bool) -> bool:
    if exactly:
        return torch.equal(logits, eager)
    return torch.allclose(logits.float(), eager.float(), rtol=0, atol=ROUNDING.get(logits.dtype, 1e-4))


def compare(eager: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Max abs difference and argmax agreement of two [R, vocab] logit blocks."""
    diff = (eager.float() - other.float()).abs().max().item()
    agree = (eager.argmax(-1) == other.argmax(-1)).float().mean().item()
    return diff, agree


def make_row(batch: Batch, eager: Measurement, graphs: Measurement, args: argparse.Namespace, device: torch.device,
             exact: Measurement | None = None) -> dict[str, Any]:
    calls = max(args.warmup - 1, 0) + args.repeats
    expected = expected_stats(batch.real_tokens, calls, args.max_num_tokens)
    # the default mode attends a padded batch's requests on their real tokens (bcg/varlen.py): rounding-level only
    packed_fast = batch.real_tokens < batch.tokens
    checks = [check(m.timed, expected, _matches(m.logits, eager.logits, exactly=m is exact or not packed_fast), device)
              for m in (graphs, exact) if m is not None]
    diff, agree = compare(eager.logits, graphs.logits)
    bucket = pick_bucket(default_capture_sizes(args.max_num_tokens), batch.real_tokens)
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
        **(exact_columns(eager, exact, device) if exact is not None else {}),
        "check": next((c for c in checks if c != "ok"), "ok"),
    }


def exact_columns(eager: Measurement, exact: Measurement, device: torch.device) -> dict[str, Any]:
    """bcg with mode="exact" beside the default's figures: time, speedup, and its logits against eager's."""
    diff, agree = compare(eager.logits, exact.logits)
    return {"exact_ms": exact.ms, **speed_columns(device, exact_speedup=eager.ms / exact.ms),
            "exact_capture_s": exact.first.capture_seconds, "exact_max_abs_diff": diff, "exact_argmax_agree": agree}


def plot(rows: list[dict[str, Any]], path: Path, title: str, max_num_tokens: int) -> Path | None:
    series = []
    for key, label, style in (("bcg_ms", "", "o-"), ("exact_ms", ", exact", "s--")):
        for index, requests in enumerate(sorted({r["requests"] for r in rows if key in r})):
            points = sorted((r["tokens"], r["eager_ms"] / r[key]) for r in rows if r["requests"] == requests)
            series.append(Series(f"R={requests}{label}", [p[0] for p in points], [p[1] for p in points],
                                 style=style, color=f"C{index}"))
    return save_plot(path, series, "tokens per call (padded)", "speedup over eager (x)", title, hline=1.0,
                     vline=(max_num_tokens, "bcg max_num_tokens"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "prefill", FULL, QUICK, GRID)
    parser.add_argument("--spread", type=float, default=0.5,
                        help="lengths uniform in [1 - spread, 1 + spread] x mean; 0: all equal (default %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.spread < 1:
        parser.error(f"--spread must be in [0, 1), got {args.spread}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench.start(args, FULL, QUICK)
    model, device = bench.model, bench.device
    vocab, pad = model.config.get_text_config(decoder=True).vocab_size, pad_token_id(model.config)
    batches = [make_batch(r, n, args.spread, vocab, pad, args.seed, device)
               for r in args.requests for n in args.lengths]

    measured = bench.run(contenders(exact=args.exact),
                         partial(run_contender, model=model, batches=batches, device=device, warmup=args.warmup,
                                 repeats=args.repeats))
    eager, graphs, exact = measured[EAGER.name], measured[BCG.name], measured.get(BCG_EXACT.name, {})

    rows = [make_row(b, eager[b.key], graphs[b.key], args, device, exact.get(b.key)) for b in batches]
    title = f"Prefill, {bench.name}: eager vs bcg{' (and mode exact)' if exact else ''} ({device_tag(device)})"
    settings = {"warmup": args.warmup, "repeats": args.repeats, "spread": args.spread, "logits_to_keep": 1}
    return bench.finish("prefill", title, rows, ("requests", "mean_len"), settings, NOTES,
                        partial(plot, rows, title=title, max_num_tokens=args.max_num_tokens))


NOTES = """\
Each call: `model(input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=1)`, a left-padded
batch with positions from the mask and a fresh DynamicCache, as `generate()` runs its prefill (last-token logits
only). Eager runs first on the unwrapped model, then `bcg.wrap_model` and the same inputs (with `--exact`,
then unwrapped and wrapped again with `mode="exact"` for the `exact_*` columns). A padded batch runs packed (real
tokens only): in the default mode on the fused graphs with attention per request (torch's varlen kernel), in
`mode="exact"` on the plain graphs with eager's padded SDPA. Times: median of the
timed calls after the warm-up calls (the first of which captures bcg's bucket, largest batches first), wall clock
between device synchronisations. tok/s counts real (non-pad) tokens. `replays`/`rejects`: bcg's counters over the
warm-up + timed calls after the capturing one. `graph_mib`: graph-pool memory the point's capture
added (stats graph_bytes); `*_peak_mib`: peak allocated GPU memory over the warm-up + timed calls (graph pools
count only for their live blocks); `max_abs_diff`/`argmax_agree`: bcg's last-token logits against eager's.
"""

if __name__ == "__main__":
    sys.exit(main())

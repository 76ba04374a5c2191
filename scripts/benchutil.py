"""The harness the benchmark scripts share: device and CLI, contenders and the wrap/run/unwrap loop, seeds, timing,
memory, bcg stats deltas and checks, bandwidth, plots, and the results tail."""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

import bcg
from bcg.buckets import DEFAULT_MAX_NUM_TOKENS
from presets import build_model, describe
from report import print_written, results_dir, write_results

MIB = 2**20
T = TypeVar("T")


def add_common_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """The options every model benchmark takes; ``benchmark`` names its results folder, ``results/<benchmark>/``."""
    parser.add_argument("--model", default=None,
                        help="preset name (see scripts/presets.py) or a HF id/path; default qwen3-0.6b on a GPU, "
                             "else tiny (in bench_prefill/bench_decode: the quick check, a small grid)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_out_dir(parser, benchmark)
    parser.add_argument("--out-name", default=None, help="results file stem (default <kind>_<model>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-tokens", type=int, default=DEFAULT_MAX_NUM_TOKENS,
                        help="bcg's max_num_tokens; calls with more tokens run eagerly (default: the library's)")


def add_out_dir(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--out-dir``, by default the benchmark's own folder ``results/<benchmark>/``."""
    default = results_dir(benchmark)
    parser.add_argument("--out-dir", type=Path, default=default,
                        help=f"where results go (default: {default.relative_to(default.parents[1])}/)")


def results_name(kind: str, model: str) -> str:
    """File stem for one model's results (a HF id's slashes made safe)."""
    return f"{kind}_{re.sub(r'[^A-Za-z0-9._-]+', '_', model).strip('_')}"


def output_stem(args: argparse.Namespace, kind: str, model: str) -> str:
    """The results file stem: ``--out-name`` when given, else ``<kind>_<model>``."""
    return args.out_name or results_name(kind, model)


def pick_device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_model(device: torch.device) -> str:
    return "qwen3-0.6b" if device.type == "cuda" else "tiny"


def bcg_backend(device: torch.device) -> str:
    """Real graphs on a GPU; on CPU the same runner without graphs (checks the plumbing, not the speed)."""
    return "cuda" if device.type == "cuda" else "eager"


EXACT_HELP = "also measure bcg with mode='exact' (eager's own kernels: outputs equal to eager's)"


def wrap_options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``bcg.wrap_model`` keyword arguments from the common command-line options."""
    return {"max_num_tokens": args.max_num_tokens, "backend": bcg_backend(device)}


def bench_parser(doc: str | None, benchmark: str, full: dict[str, Any], quick: dict[str, Any],
                 grid: dict[str, str]) -> argparse.ArgumentParser:
    """A grid benchmark's command line: the common options (results in ``results/<benchmark>/``), ``--exact``, and
    one integer option per ``grid`` entry (what it means; its default is ``full``'s, or ``quick``'s in the quick
    check)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, benchmark)
    for option, meaning in grid.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=int,
                            nargs="+" if isinstance(full[option], list) else None,
                            help=f"{meaning}; {grid_help(option, full, quick)}")
    parser.add_argument("--exact", action="store_true", help=EXACT_HELP)
    return parser


@dataclass(frozen=True)
class Contender:
    """One way of running the model: unwrapped (``wrap`` None) or wrapped by bcg with ``wrap`` on top of the command
    line's options; ``generate``: its own ``generate()`` keyword arguments (decode)."""

    name: str
    color: str  # its colour in plots
    wrap: dict[str, Any] | None = None
    generate: dict[str, Any] = field(default_factory=dict)


EAGER = Contender("eager", "C0")
COMPILED = Contender("hf-compile", "C1")  # decode: a StaticCache, with which generate() compiles (bench_decode)
BCG = Contender("bcg", "C2", wrap={})  # the defaults: mode="fast", decode steps as full graphs on static stand-ins
# the defaults without static stand-ins: decode steps take the breaks on generate()'s own cache (as sliding-window and
# hybrid caches always do)
BCG_BREAKS = Contender("bcg-breaks", "C4", wrap={"static_cache": False})
BCG_EXACT = Contender("bcg-exact", "C3", wrap={"mode": "exact"})


def contenders(*, exact: bool, compiled: bool = False, breaks: bool = False) -> list[Contender]:
    """The contenders of a run, in the order they run and stand in the tables: eager (the reference) first."""
    chosen = ((EAGER, True), (COMPILED, compiled), (BCG, True), (BCG_BREAKS, breaks), (BCG_EXACT, exact))
    return [contender for contender, wanted in chosen if wanted]


def point_generator(seed: int, first: int, second: int) -> torch.Generator:
    """The random source of one grid point's inputs: seeded per point, so restricting the grid keeps every remaining
    point's inputs unchanged."""
    return torch.Generator().manual_seed(seed * 1_000_003 + first * 1009 + second)


def measures_speed(device: torch.device) -> bool:
    """Whether a run's times are speed figures: only on a GPU, where bcg replays real CUDA graphs."""
    return device.type == "cuda"


def speed_caveat(device: torch.device) -> str | None:
    """None on a GPU; elsewhere the warning that the run's console output and results files carry."""
    if measures_speed(device):
        return None
    return (f"NOT speed figures: on {device.type} bcg runs its eager backend (no CUDA graphs), so this run checks "
            "the code path only and leaves speedups out; speed needs a GPU.")


def speed_columns(device: torch.device, **ratios: float) -> dict[str, float]:
    """The speedup columns on a GPU; none elsewhere, where they would read as speed figures."""
    return ratios if measures_speed(device) else {}


def device_tag(device: torch.device) -> str:
    """The device as titles (tables, plots) name it; off a GPU with the speed caveat."""
    return device.type if measures_speed(device) else f"{device.type}: code path only, NOT speed figures"


def announce_device(device: torch.device) -> None:
    if measures_speed(device):
        print(f"device: {torch.cuda.get_device_name(device)}")
        return
    print("=" * 78)
    print(f"device: {device}. {speed_caveat(device)}")
    print("=" * 78)


def grid_help(option: str, full: dict[str, Any], quick: dict[str, Any]) -> str:
    """Help text naming an option's default on a GPU (or with --model) and in the quick CPU check."""
    return f"default {_spelled(full[option])}; {_spelled(quick[option])} in the quick check (no GPU, no --model)"


def resolve_defaults(args: argparse.Namespace, device: torch.device, full: dict[str, Any],
                     quick: dict[str, Any]) -> str:
    """Fill in ``--model`` and the unset grid options (``full`` on a GPU or with ``--model``, else the quick check);
    return the model name."""
    is_quick = args.model is None and not measures_speed(device)
    args.model = args.model or default_model(device)
    for option, value in (quick if is_quick else full).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if is_quick:
        chosen = [f"--{option.replace('_', '-')} {_spelled(getattr(args, option))}" for option in quick]
        print("no GPU and no --model: the quick check, " + " ".join([f"--model {args.model}", *chosen]))
    return args.model


def _spelled(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds one call takes, from a drained device to a drained device, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(fn: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Median seconds over ``repeats`` calls, and the last call's result."""
    times = []
    result = None
    for _ in range(repeats):
        seconds, result = timed(fn, device)
        times.append(seconds)
    return statistics.median(times), result


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MIB


@dataclass(frozen=True)
class StatsDelta:
    """What bcg did between two ``handle.stats()`` snapshots."""

    replays: int
    rejects: dict[str, int]
    capture_seconds: float
    graph_bytes: int

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> StatsDelta:
        rejects = Counter(after["rejects"])
        rejects.subtract(before["rejects"])
        return cls(
            replays=after["replays"] - before["replays"],
            rejects={reason: n for reason, n in rejects.items() if n},
            capture_seconds=after["capture_seconds"] - before["capture_seconds"],
            graph_bytes=after["graph_bytes"] - before["graph_bytes"],
        )


def snapshot(handle: Any) -> dict[str, Any] | None:
    """``handle.stats()``, or None for a contender that is not bcg."""
    return handle.stats() if handle is not None else None


def stats_since(handle: Any, before: dict[str, Any] | None) -> StatsDelta | None:
    return StatsDelta.between(before, handle.stats()) if handle is not None else None


def format_rejects(rejects: dict[str, int]) -> str:
    return ",".join(f"{reason}:{n}" for reason, n in sorted(rejects.items())) or "0"


def expected_stats(tokens: int, prefills: int, max_num_tokens: int, steps: int = 0) -> tuple[int, dict[str, int]]:
    """The replays and rejects bcg must count: ``prefills`` calls of ``tokens`` tokens replay up to max_num_tokens
    and are rejected beyond it (too_many_tokens, by design); ``steps`` one-token decode calls always replay."""
    if tokens <= max_num_tokens:
        return prefills + steps, {}
    return steps, {"too_many_tokens": prefills}


def check(stats: StatsDelta, expected: tuple[int, dict[str, int]], identical: bool, device: torch.device) -> str:
    """A bcg contender's ``check`` column: ok, UNEXPECTED (its counters are not ``expected``) or DIFFERS (on the
    eager backend, which runs eager's own kernels, its outputs are not ``identical`` to eager's)."""
    if (stats.replays, stats.rejects) != expected:
        return "UNEXPECTED"
    if bcg_backend(device) == "eager" and not identical:
        return "DIFFERS"
    return "ok"


CHECK_NOTE = """\
`check`: ok when bcg's counters show what it must do (every call replays up to max_num_tokens tokens; a prefill of
more runs eagerly by design, counted as too_many_tokens) and, on the eager backend (no GPU), its outputs equal
eager's exactly (the default mode on a padded prefill, whose attention runs per request on the real tokens: within
rounding, 5e-2 in bf16, 1e-4 in fp32); the script exits non-zero when any row is not ok.
"""


def hbm_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float | None:
    """Device-memory bandwidth in bytes/s from a large device-to-device copy (bytes read + written / time)."""
    if device.type != "cuda":
        return None
    nbytes = int(gib * 2**30)
    seconds = _copy_seconds(nbytes, device, repeats)
    torch.cuda.empty_cache()  # the two buffers are gone: hand their memory back
    return 2 * nbytes / seconds


def _copy_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch
    seconds, _ = median_seconds(partial(target.copy_, source), device, repeats)
    return seconds


@dataclass
class Series:
    """One line of a plot."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "o-"
    color: str | None = None


def save_plot(path: Path, series: list[Series], xlabel: str, ylabel: str, title: str,
              hline: float | None = None, vline: tuple[float, str] | None = None, logx: bool = True,
              logy: bool = False) -> Path | None:
    """Write a PNG (matplotlib, Agg); without matplotlib say so and return None: the JSON/Markdown still stand."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot {path.name} (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for line in series:
        axes.plot(line.x, line.y, line.style, label=line.label, color=line.color)
    if hline is not None:
        axes.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if vline is not None:
        axes.axvline(vline[0], color="grey", linestyle=":", linewidth=1, label=vline[1])
    if logx:
        axes.set_xscale("log", base=2)
    if logy:
        axes.set_yscale("log")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@dataclass
class Bench:
    """One benchmark run: options, device and model; each contender wrapped, run and unwrapped in turn; the results
    written with their command and machine."""

    args: argparse.Namespace
    device: torch.device
    name: str
    model: PreTrainedModel
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # bcg contender -> handle.stats() at its end

    @classmethod
    def start(cls, args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]) -> Bench:
        device = pick_device(args.device)
        announce_device(device)
        name = resolve_defaults(args, device, full, quick)
        return cls(args, device, name, build_model(name, device, seed=args.seed))

    def run(self, contenders: Sequence[Contender],
            measure: Callable[[Contender, bcg.BcgHandle | None], T]) -> dict[str, T]:
        """``measure`` each contender in turn on the same model, under no_grad; a bcg contender wrapped for it alone."""
        results = {}
        with torch.no_grad():
            for contender in contenders:
                if contender.wrap is None:
                    results[contender.name] = measure(contender, None)
                    continue
                handle = bcg.wrap_model(self.model, **contender.wrap, **wrap_options(self.args, self.device))
                try:
                    results[contender.name] = measure(contender, handle)
                    self.final[contender.name] = handle.stats()
                finally:
                    bcg.unwrap_model(self.model)
        return results

    def finish(self, kind: str, title: str, rows: list[dict[str, Any]], keys: Sequence[str], settings: dict[str, Any],
               notes: str, plot: Callable[[Path], Path | None], extra: dict[str, Any] | None = None) -> int:
        """Plot, write ``<kind>_<model>.json``/``.md`` (rows, model, settings, bcg's final stats), name every row
        whose ``check`` is not ok by its ``keys`` columns, then the files written; 1 if a row is not ok, else 0."""
        stem = output_stem(self.args, kind, self.name)
        png = plot(self.args.out_dir / f"{stem}.png")
        payload = {
            "model": describe(self.name, self.model),
            "settings": {**settings, "seed": self.args.seed, "max_num_tokens": self.args.max_num_tokens,
                         "backend": bcg_backend(self.device)},
            **(extra or {}),
            "bcg_final_stats": self.final,
        }
        written = write_results(stem, title, rows, payload, notes=f"{notes}{CHECK_NOTE}", out_dir=self.args.out_dir,
                                caveat=speed_caveat(self.device))
        flagged = [row for row in rows if row["check"] != "ok"]
        for row in flagged:
            where = ", ".join(f"{key} {row[key]}" for key in keys)
            print(f"{row['check']}: {where}: replays {row['replays']}, rejects {row['rejects']}")
        print_written([*written, png])
        return 1 if flagged else 0

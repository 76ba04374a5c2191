"""Index results/: write results/README.md and README.md's "measured at a glance" table from the results files.

results/ holds one folder per benchmark: its current figures in the folder, runs a later one replaced in its
``superseded/`` folder. Every JSON file there records its command, machine and date (``scripts/report.py`` writes
them); ``results/notes.json`` adds what a file's JSON cannot say (what the run was for, the commit it measured where
the file does not record one, what superseded it). This script merges both into one table per folder, and fills the
README's table between ``<!-- glance:begin -->`` and ``<!-- glance:end -->`` from named current files, so neither
can drift from the figures.

    python scripts/index_results.py            # rewrite results/README.md and the README's glance table
    python scripts/index_results.py --check    # exit 1 naming what differs from what this script would write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SUPERSEDED = "superseded"
NOTES = "notes.json"
INDEX = "README.md"
GLANCE_BEGIN, GLANCE_END = "<!-- glance:begin -->", "<!-- glance:end -->"
# The caveat benchutil.speed_caveat gives runs off a GPU: a code-path check, not a figure (tests keep the two equal).
CODE_PATH_CHECK = "NOT speed figures: on "
# Files that belong to another file's run: mgsm_sweep's --log-samples responses.
ATTACHMENTS = ("_samples",)
# The order folders are listed in; others follow alphabetically.
FOLDER_ORDER = ("prefill", "decode", "mgsm", "capture", "varlen_attention", "decode_attention", "sweep_architectures",
                "profile", "agreement_probe", "gpu_suite")
# What a results JSON file records of itself, and notes.json gives for text files, which record it in prose if at all.
TEXT_FIELDS = ("title", "date", "gpu", "torch", "transformers")
COMMIT_SUFFIX = re.compile(r"_(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7}$")  # a name ending in a short hash


@dataclass(frozen=True)
class Run:
    """One results file (its .json/.md/.png/.txt siblings together) as the index lists it."""

    key: str  # its path under results/ without suffix, e.g. "decode/decode_qwen3-8b"
    suffixes: tuple[str, ...]
    title: str = ""
    date: str = ""
    gpu: str = ""
    torch: str = ""
    transformers: str = ""
    commit: str = ""
    command: str = ""
    note: str = ""
    superseded_by: str = ""

    @property
    def folder(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def superseded(self) -> bool:
        return f"/{SUPERSEDED}/" in self.key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[1]


def load_notes(results: Path) -> dict[str, Any]:
    """results/notes.json: ``folders`` (folder -> what it holds) and ``files`` (key -> commit, note, superseded_by,
    and for text files command, title and machine)."""
    path = results / NOTES
    return json.loads(path.read_text()) if path.is_file() else {"folders": {}, "files": {}}


def result_files(results: Path) -> dict[str, list[Path]]:
    """Every results file under a benchmark folder, grouped by key (path without suffix); READMEs and notes apart."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(results.rglob("*")):
        if not path.is_file() or path.parent == results or path.name == INDEX or path.name.startswith("."):
            continue
        key = path.relative_to(results).with_suffix("").as_posix()
        for suffix in ATTACHMENTS:
            key = key.removesuffix(suffix)
        groups.setdefault(key, []).append(path)
    return groups


def read_run(key: str, paths: list[Path], note: dict[str, Any]) -> Run | None:
    """The index row of one group of files; None for a code-path check (a run off a GPU: no figures to index)."""
    payload = _payload(paths)
    if str(payload.get("caveat") or "").startswith(CODE_PATH_CHECK):
        return None
    recorded = _lm_eval_fields(payload) if "pretty_env_info" in payload else _report_fields(payload)
    fields = {name: recorded.get(name) or note.get(name, "") for name in TEXT_FIELDS}  # text files: from the notes
    return Run(
        key=key,
        suffixes=tuple(sorted({p.suffix for p in paths}, key=_suffix_rank)),
        commit=str(payload.get("commit") or note.get("commit") or ""),
        command=str(payload.get("command") or note.get("command") or ""),
        note=note.get("note", ""),
        superseded_by=note.get("superseded_by", ""),
        **fields,
    )


def _suffix_rank(suffix: str) -> tuple[int, str]:
    """The order a run's files are named in: the readable Markdown first, then the data, the plot, anything else."""
    order = (".md", ".json", ".png", ".txt")
    return (order.index(suffix) if suffix in order else len(order), suffix)


def _payload(paths: list[Path]) -> dict[str, Any]:
    """The group's JSON file (not an attachment), or an empty dict for text-only results."""
    for path in paths:
        if path.suffix == ".json" and not path.stem.endswith(ATTACHMENTS):
            return json.loads(path.read_text())
    return {}


def _report_fields(payload: dict[str, Any]) -> dict[str, str]:
    """Title, date, GPU and versions of a file scripts/report.py wrote."""
    machine = payload.get("machine") or {}
    gpu = machine.get("gpu") or ("CPU" if machine else "")
    return {"title": payload.get("title", ""), "date": _short_date(payload.get("date")), "gpu": short_gpu(gpu),
            "torch": machine.get("torch", ""), "transformers": machine.get("transformers", "")}


def _lm_eval_fields(payload: dict[str, Any]) -> dict[str, str]:
    """The same fields from lm-eval's own results file (its environment report and a Unix date)."""
    env = payload.get("pretty_env_info", "")
    gpu = re.search(r"GPU 0: (.+)", env)
    torch_version = re.search(r"PyTorch version: (\S+)", env)
    return {"title": "lm-eval results: " + ", ".join(payload.get("results", {})),
            "date": _short_date(payload.get("date")), "gpu": short_gpu(gpu.group(1) if gpu else ""),
            "torch": torch_version.group(1) if torch_version else "",
            "transformers": payload.get("transformers_version", "")}


def _short_date(value: Any) -> str:
    """``YYYY-MM-DD HH:MM`` (UTC) from an ISO date or a Unix time."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M")
    return str(value or "")[:16].replace("T", " ")


def short_gpu(gpu: str) -> str:
    """``NVIDIA H200 (140 GiB)`` -> ``H200``: the card as a table names it."""
    return re.sub(r"\s*\(\d+ GiB\)$", "", gpu.removeprefix("NVIDIA ")).strip()


def collect(results: Path) -> list[Run]:
    """Every indexed run under ``results``, in folder order, current before superseded."""
    notes = load_notes(results)["files"]
    runs = [run for key, paths in result_files(results).items()
            if (run := read_run(key, paths, notes.get(key, {}))) is not None]
    return sorted(runs, key=lambda r: (_folder_rank(r.folder), r.superseded, r.key))


def _folder_rank(folder: str) -> tuple[int, str]:
    return (FOLDER_ORDER.index(folder) if folder in FOLDER_ORDER else len(FOLDER_ORDER), folder)


def folders(results: Path) -> list[str]:
    """The benchmark folders under ``results``, in index order."""
    return sorted((p.name for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_folder_rank)


INDEX_HEAD = """\
# Results

Generated by `python scripts/index_results.py` from the files below and `notes.json`: do not edit by hand (edit
`notes.json`, then run the script; `--check`, run by the tests, fails when this page or the README's table drifts).

One folder per benchmark; each script writes to its own folder by default (`--out-dir`). The current figures sit in
the folder, runs a later one replaced in its `superseded/` folder (a name ending in a commit hash, such as
`_4992e0c`, is superseded by the same name without it). Code-path checks off a GPU (caveat `NOT speed figures: on
cpu ...`) are left out, and the tiny preset's files (`*_tiny.*`) are ignored by git.
Random-initialised weights (the presets) make bf16 logits near-uniform: `same_tokens` below 1 in the decode tables is
expected there, for HF's compiled path too; token agreement is judged on a real model (SmolLM2, `mgsm/`).
Commit: the code version a run measured, from the file where it records one, else from `notes.json`. What the figures
say, and their history: [docs/benchmarks.md](../docs/benchmarks.md).
"""
COLUMNS = ("file", "title", "date (UTC)", "GPU", "torch", "transformers", "commit", "command")


def render_index(results: Path) -> str:
    """results/README.md: the head, then per folder what it holds, its current runs and its superseded runs."""
    runs = collect(results)
    described = load_notes(results)["folders"]
    parts = [INDEX_HEAD]
    for folder in folders(results):
        parts.append(f"\n## {folder}/\n\n{described.get(folder, '')}".rstrip() + "\n")
        if (results / folder / INDEX).is_file():
            parts.append(f"\nSee [{folder}/{INDEX}]({folder}/{INDEX}).\n")
        for superseded, heading in ((False, "Current"), (True, "Superseded")):
            chosen = [r for r in runs if r.folder == folder and r.superseded == superseded]
            if chosen:
                parts.append(f"\n{heading}:\n\n{_table(chosen)}\n{_notes(chosen, runs)}")
    return "".join(parts)


def _table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        cells = (_file_cell(run), run.title, run.date, run.gpu, run.torch, run.transformers, run.commit,
                 f"`{run.command}`" if run.command else "")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _file_cell(run: Run) -> str:
    """The file's name linked to its first form (Markdown, else JSON, else text), the other forms after it."""
    first, *others = run.suffixes
    return _link(run) + (f" ({', '.join(s[1:] for s in others)})" if others else "")


def _link(run: Run) -> str:
    """A link from results/README.md to the run's first form."""
    return f"[{run.name}]({run.key}{run.suffixes[0]})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _notes(runs: list[Run], every: list[Run]) -> str:
    """One line per run with a note, or naming what superseded it (one of ``every``)."""
    by_key = {run.key: run for run in every}
    lines = []
    for run in runs:
        successor = by_key.get(run.superseded_by)
        replaced = f" Superseded by {_link(successor)}." if successor else ""
        if run.note or replaced:
            note = f"{run.note.rstrip('.')}." if run.note else ""
            lines.append(f"- `{run.name}`: {note}{replaced}")
    return "\n".join(lines) + ("\n" if lines else "")


# The README's glance table: which current file gives each row, and how its cells are read from the file.
Cells = tuple[str, str, str]  # eager, HF StaticCache + torch.compile, bcg (defaults)


@dataclass(frozen=True)
class GlanceRow:
    """One row of the README's table: what it measures, the file it comes from, and the reader of its cells."""

    what: str
    source: str  # a run's key, e.g. "decode/decode_qwen3-8b"
    cells: Callable[[dict[str, Any]], Cells]


def _by(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [row for row in rows if all(row.get(k) == v for k, v in match.items())]


def _pair(values: Iterable[float], spec: str) -> str:
    return " / ".join(format(v, spec) for v in values)


def decode_cells(payload: dict[str, Any]) -> Cells:
    """ms/token per batch size for eager, HF compile and bcg (first calls beside), `static_cache=False` where run."""
    rows = payload["rows"]

    def ms(contender: str) -> list[float]:
        return [r["ms_per_token"] for r in _by(rows, contender=contender)]

    def first(contender: str) -> str:
        return f"(first call {_pair((r['first_call_s'] for r in _by(rows, contender=contender)), '.2g')} s)"

    compiled = f"{_pair(ms('hf-compile'), '.2f')} {first('hf-compile')}" if ms("hf-compile") else "not run"
    bcg = f"**{_pair(ms('bcg'), '.2f')}** {first('bcg')}"
    if ms("bcg-breaks"):
        bcg += f"; `static_cache=False`: {_pair(ms('bcg-breaks'), '.2f')}"
    return _pair(ms("eager"), ".2f"), compiled, bcg


def generation_cells(payload: dict[str, Any]) -> Cells:
    """Generated tokens/s of a multi-request run, bcg's speed-up over eager beside it."""
    rows = payload["rows"]

    def tokens(contender: str) -> str:
        (row,) = _by(rows, contender=contender)
        return f"{row['tok_s']:.0f}" + ("" if contender == "eager" else f" ({row['speedup']:.1f}x)")

    bcg = f"**{tokens('bcg')}**"
    if _by(rows, contender="bcg-breaks"):
        bcg += f"; `static_cache=False`: {tokens('bcg-breaks')}"
    return tokens("eager"), "not run", bcg


def prefill_cells(requests: int) -> Callable[[dict[str, Any]], Cells]:
    """ms per prefill of ``requests`` requests, eager and bcg, with the speed-up."""

    def cells(payload: dict[str, Any]) -> Cells:
        (row,) = _by(payload["rows"], requests=requests)
        return f"{row['eager_ms']:.2f}", "-", f"**{row['bcg_ms']:.2f}** ({row['speedup']:.2f}x)"

    return cells


def _scores(row: dict[str, Any], metric: str) -> tuple[str, str]:
    """Eager's and bcg's score of ``metric`` from a comparison row's ``scores (eager / bcg)`` text."""
    found = re.search(rf"{re.escape(metric)} ([\d.]+) / ([\d.]+)", row["scores (eager / bcg)"])
    return found.group(1), found.group(2)


def mgsm_cells(payload: dict[str, Any]) -> Cells:
    """flexible-extract / choice accuracy / generated tokens/s, eager and per mode, with identical responses."""
    rows, speed = payload["rows"], payload["speed"]

    def mode(name: str) -> tuple[str, str]:
        """Eager's cell, and this mode's (its share of generated responses identical to eager's beside it)."""
        (gen,) = _by(rows, task="mgsm_direct_en_local", mode=name)
        (choice,) = _by(rows, task="mgsm_choice_en_local", mode=name)
        (rate,) = _by(speed, request_type="generate_until", mode=name)
        (gen_eager, gen_bcg), (choice_eager, choice_bcg) = _scores(gen, "flexible-extract"), _scores(choice, "acc,none")
        return (f"{gen_eager} / {choice_eager} / {rate['eager_tok_s']:.4g}",
                f"{gen_bcg} / {choice_bcg} / {rate['bcg_tok_s']:.4g} ({gen['identical']:.1%} identical)")

    eager, fast = mode("fast")
    exact = mode("exact")[1]
    return eager, "-", f"**{fast}**; `mode=\"exact\"`: {exact}"


GLANCE = (
    GlanceRow("decode ms/token, Qwen3-8B, batch 1 / 8, context 256", "decode/decode_qwen3-8b", decode_cells),
    GlanceRow("decode ms/token, Qwen3-0.6B, batch 1 / 8, context 256", "decode/decode_qwen3-0.6b", decode_cells),
    GlanceRow("generated tokens/s, 32 prompts of 64..192 tokens, 128 new, Qwen3-0.6B",
              "decode/decode_qwen3-0.6b_32_requests", generation_cells),
    GlanceRow("the same, Qwen3-8B", "decode/decode_qwen3-8b_32_requests", generation_cells),
    GlanceRow("decode ms/token, Qwen3.5-like 9B (hybrid), batch 1 / 8, context 256", "decode/decode_qwen3.5-like-9b",
              decode_cells),
    GlanceRow("prefill ms, Qwen3-0.6B, 32 requests of 64..192 tokens", "prefill/prefill_qwen3-0.6b_varlen_fused",
              prefill_cells(32)),
    GlanceRow("prefill ms, Qwen3-8B, 8 requests of 64..192 tokens", "prefill/prefill_qwen3-8b_varlen_fused",
              prefill_cells(8)),
    GlanceRow("MGSM, SmolLM2-135M-Instruct, batch 32: flexible-extract / choice acc / generated tokens/s",
              "mgsm/mgsm_smollm2-135m-instruct_static_default_bs32", mgsm_cells),
)
GLANCE_COLUMNS = ("what", "GPU", "eager", "HF StaticCache + torch.compile", "bcg (defaults)", "file")


def render_glance(results: Path, rows: tuple[GlanceRow, ...] = GLANCE) -> str:
    """The README's table, each row read from its current results file, with the versions the files record."""
    runs = {run.key: run for run in collect(results)}
    lines = ["| " + " | ".join(GLANCE_COLUMNS) + " |", "|" + "---|" * len(GLANCE_COLUMNS)]
    versions = set()
    for row in rows:
        run = runs[row.source]
        payload = json.loads((results / f"{row.source}.json").read_text())
        versions.add(f"torch {run.torch}, transformers {run.transformers}")
        link = f"[{run.name}](results/{row.source}.md)"
        lines.append("| " + " | ".join((row.what, run.gpu, *row.cells(payload), link)) + " |")
    head = (f"bf16, {'; '.join(sorted(versions))}; random-initialised Qwen3 / Qwen3.5-like shapes,\n"
            "SmolLM2-135M-Instruct (Q4_1) for accuracy. Each row is one run with its peers side by side: compare\n"
            "within a row (host-bound times, eager's above all, vary from run to run). Generated by\n"
            "`scripts/index_results.py`.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def with_glance(readme: str, glance: str) -> str:
    """``readme`` with the text between the glance markers replaced by ``glance``."""
    start, end = readme.find(GLANCE_BEGIN), readme.find(GLANCE_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {GLANCE_BEGIN} ... {GLANCE_END} block")
    return f"{readme[:start]}{GLANCE_BEGIN}\n{glance}{readme[end:]}"


def problems(results: Path, rows: tuple[GlanceRow, ...] = GLANCE) -> list[str]:
    """What is inconsistent in results/ itself: notes naming no file, a missing successor, a hash-named current file,
    a glance row from a superseded or missing file, a JSON file without command or machine."""
    runs = {run.key: run for run in collect(results)}
    groups = result_files(results)
    found = [f"notes.json names {key}, which is not there" for key in load_notes(results)["files"] if key not in groups]
    for run in runs.values():
        if run.superseded_by and run.superseded_by not in runs:
            found.append(f"{run.key}: superseded by {run.superseded_by}, which is not indexed")
        if not run.superseded and COMMIT_SUFFIX.search(run.name):
            found.append(f"{run.key}: a name ending in a commit hash belongs in {run.folder}/{SUPERSEDED}/")
        if ".json" in run.suffixes and not (run.command and run.gpu):
            found.append(f"{run.key}: records no command or machine")
    for row in rows:
        if row.source not in runs or runs[row.source].superseded:
            found.append(f"README glance row '{row.what}': {row.source} is not a current results file")
    return found


def check(repo: Path = REPO, rows: tuple[GlanceRow, ...] = GLANCE) -> list[str]:
    """Everything that differs from what this script would write, and the problems of results/; empty when in step."""
    results = repo / "results"
    found = problems(results, rows)
    if found:
        return found
    index = results / INDEX
    if not index.is_file() or index.read_text() != render_index(results):
        found.append("results/README.md differs from what scripts/index_results.py writes")
    readme = (repo / "README.md").read_text()
    try:
        if readme != with_glance(readme, render_glance(results, rows)):
            found.append("README.md's glance table differs from what scripts/index_results.py writes")
    except ValueError as error:
        found.append(str(error))
    return found


def write(repo: Path = REPO, rows: tuple[GlanceRow, ...] = GLANCE) -> list[Path]:
    """Rewrite results/README.md and the README's glance table; return the files written."""
    results = repo / "results"
    index, readme = results / INDEX, repo / "README.md"
    texts = {index: render_index(results), readme: with_glance(readme.read_text(), render_glance(results, rows))}
    for path, text in texts.items():
        path.write_text(text)
    return list(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when anything differs")
    args = parser.parse_args(argv)
    if args.check:
        found = check()
        for line in found:
            print(line)
        return 1 if found else 0
    found = problems(REPO / "results")
    for line in found:
        print(line)
    if found:
        return 1
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared results writer for bcg's scripts: JSON + Markdown under results/<benchmark>/, with command, commit, machine
and versions (scripts/index_results.py indexes them in results/README.md)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "results"
# Kernel packages transformers' modeling code takes a fast path with when installed (a hybrid model's mixers).
OPTIONAL_KERNELS = ("triton", "flash-linear-attention", "causal-conv1d", "mamba-ssm", "flash-attn")


def machine() -> dict[str, Any]:
    """The machine and library versions a figure was measured with."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "host_cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    if installed := _installed(OPTIONAL_KERNELS):
        info["kernels"] = installed
    return info


def _installed(distributions: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def results_dir(benchmark: str) -> Path:
    """A benchmark's default output folder, ``results/<benchmark>/``: its current figures (older runs are moved to
    its ``superseded/`` folder by hand)."""
    return RESULTS_DIR / benchmark


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def commit() -> str | None:
    """``BCG_COMMIT`` when set (a copy of the tree on a GPU machine may carry no ``.git``, or a stale one: the device
    tool copies the working tree beside the ``.git`` of the session's start), else the checkout's short commit hash,
    ``+dirty`` when tracked files differ from it; None outside a git checkout."""
    if os.environ.get("BCG_COMMIT"):
        return os.environ["BCG_COMMIT"]
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def _git(*arguments: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def print_written(paths: Iterable[Path | None]) -> None:
    """End a run by naming the files it wrote (None: a file it could not write, such as a plot without matplotlib)."""
    written = [path for path in paths if path is not None]
    print("results written:" if written else "no results written")
    for path in written:
        print(f"  {path}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(name: str, title: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                  notes: str = "", out_dir: Path | None = None, caveat: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md``; print the table; return both paths (callers name them last,
    ``print_written``).

    ``caveat`` (e.g. that CPU times are no speed figures) heads the Markdown, sits in the JSON and follows the table.
    """
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": command(), "commit": commit(), "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    payload = {"title": title, "caveat": caveat, **meta, "rows": rows, **(extra or {})}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    table = markdown_table(rows)
    md = [f"# {title}", "", *([f"**{caveat}**", ""] if caveat else []), f"Command: `{meta['command']}`", "",
          f"Commit: {meta['commit']}", "", f"Machine: {json.dumps(meta['machine'])}", "", f"Date: {meta['date']}", "",
          table]
    if notes:
        md += ["", notes, ""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    print(table)
    if caveat:
        print(caveat)
    return json_path, md_path

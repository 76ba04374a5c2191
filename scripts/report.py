"""Shared results writer for bcg's scripts: JSON + Markdown under results/, with command, machine and versions."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
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


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


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
    """Write ``<name>.json`` and ``<name>.md``; print the table; return both paths.

    ``caveat`` (e.g. that CPU times are no speed figures) heads the Markdown, sits in the JSON and follows the table.
    """
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": command(), "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    payload = {"title": title, "caveat": caveat, **meta, "rows": rows, **(extra or {})}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    table = markdown_table(rows)
    md = [f"# {title}", "", *([f"**{caveat}**", ""] if caveat else []), f"Command: `{meta['command']}`", "",
          f"Machine: {json.dumps(meta['machine'])}", "", f"Date: {meta['date']}", "", table]
    if notes:
        md += ["", notes, ""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    print(table)
    if caveat:
        print(caveat)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path

"""results/README.md and the README's "measured at a glance" table are what scripts/index_results.py generates from the
results files: neither can drift from the figures (CPU, offline, no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import index_results  # noqa: E402

GLANCE_README = f"# t\n\n{index_results.GLANCE_BEGIN}\n{index_results.GLANCE_END}\n"


def _decode_run(ms: list[float], gpu: str = "NVIDIA H200 (140 GiB)", **extra: object) -> dict:
    """A results file as scripts/report.py writes one for bench_decode: eager and bcg at batch 1 and 8."""
    rows = [{"batch": batch, "contender": contender, "ms_per_token": value, "first_call_s": 1.0}
            for batch, (eager, bcg) in zip((1, 8), zip(ms[::2], ms[1::2]))
            for contender, value in (("eager", eager), ("bcg", bcg))]
    return {"title": "Decode, x", "caveat": None, "command": "python3 bench_decode.py --model x", "commit": "abc1234",
            "machine": {"gpu": gpu, "torch": "2.11.0+cu130", "transformers": "5.17.0"},
            "date": "2026-11-29T04:52:53+00:00", "rows": rows, **extra}


def _repo(tmp_path: Path, files: dict[str, dict], notes: dict | None = None) -> Path:
    """A checkout of its own: a README with the glance markers, and ``files`` (key -> JSON payload) under results/."""
    (tmp_path / "README.md").write_text(GLANCE_README)
    results = tmp_path / "results"
    for key, payload in files.items():
        path = results / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
    results.mkdir(exist_ok=True)
    (results / index_results.NOTES).write_text(json.dumps({"folders": {}, "files": notes or {}}))
    return tmp_path


DECODE_ROW = (index_results.GlanceRow("decode ms/token", "decode/decode_x", index_results.decode_cells),)


def test_the_index_and_the_readme_table_are_what_the_script_writes():
    assert index_results.check(REPO) == []


def test_every_readme_figure_comes_from_a_current_file_that_records_command_and_machine():
    runs = {run.key: run for run in index_results.collect(REPO / "results")}
    for row in index_results.GLANCE:
        run = runs[row.source]
        assert not run.superseded and run.command and run.gpu, row
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(index_results.GLANCE_BEGIN):readme.index(index_results.GLANCE_END)]
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ")][1:]  # past the header
    assert [cells[1] for cells in rows] == [runs[row.source].gpu for row in index_results.GLANCE]  # each names its GPU


def test_a_changed_figure_or_a_moved_file_is_drift(tmp_path):
    repo = _repo(tmp_path, {"decode/decode_x": _decode_run([40.0, 4.0, 45.0, 4.5])})
    assert index_results.check(repo, DECODE_ROW) == ["results/README.md differs from what scripts/index_results.py "
                                                     "writes", "README.md's glance table differs from what "
                                                     "scripts/index_results.py writes"]
    index_results.write(repo, DECODE_ROW)
    assert index_results.check(repo, DECODE_ROW) == []
    readme = (repo / "README.md").read_text()
    assert "| decode ms/token | H200 | 40.00 / 45.00 | not run | **4.00 / 4.50** (first call 1 / 1 s) |" in readme

    (repo / "results/decode/decode_x.json").write_text(json.dumps(_decode_run([40.0, 3.9, 45.0, 4.5])))
    assert index_results.check(repo, DECODE_ROW) == [  # the index lists no figures: only the README's table moved
        "README.md's glance table differs from what scripts/index_results.py writes"]
    index_results.write(repo, DECODE_ROW)
    (repo / "results/decode/superseded").mkdir()
    (repo / "results/decode/decode_x.json").rename(repo / "results/decode/superseded/decode_x.json")
    assert index_results.check(repo, DECODE_ROW) == [
        "README glance row 'decode ms/token': decode/decode_x is not a current results file"]


def test_code_path_checks_off_a_gpu_are_left_out(tmp_path):
    import benchutil
    import torch

    caveat = benchutil.speed_caveat(torch.device("cpu"))
    assert caveat.startswith(index_results.CODE_PATH_CHECK)
    repo = _repo(tmp_path, {"prefill/prefill_tiny": {**_decode_run([1, 1, 1, 1], gpu=None), "caveat": caveat},
                            "sweep_architectures/sweep": {**_decode_run([1, 1, 1, 1], gpu=None),
                                                          "caveat": "CPU correctness sweep: NOT speed figures"}})
    assert [run.key for run in index_results.collect(repo / "results")] == ["sweep_architectures/sweep"]


def test_results_problems_are_named(tmp_path):
    files = {"decode/decode_x_4992e0c": _decode_run([1, 1, 1, 1]), "decode/superseded/decode_y": _decode_run([1] * 4),
             "mgsm/lmeval": {"title": "no command", "machine": {"gpu": "NVIDIA H100"}, "rows": []}}
    notes = {"decode/superseded/decode_y": {"superseded_by": "decode/decode_z"}, "decode/gone": {"note": "moved"}}
    found = index_results.problems(_repo(tmp_path, files, notes) / "results", ())
    assert sorted(found) == sorted([
        "notes.json names decode/gone, which is not there",
        "decode/superseded/decode_y: superseded by decode/decode_z, which is not indexed",
        "decode/decode_x_4992e0c: a name ending in a commit hash belongs in decode/superseded/",
        "mgsm/lmeval: records no command or machine",
    ])


def test_lm_eval_results_files_are_read_from_their_own_fields(tmp_path):
    payload = {"results": {"mgsm_direct_en_local": {}}, "date": 1795911020.7, "transformers_version": "5.17.0",
               "pretty_env_info": "PyTorch version: 2.11.0+cu130\nGPU models and configuration: GPU 0: NVIDIA H200\n"}
    repo = _repo(tmp_path, {"mgsm/lmeval_cli_x": payload}, {"mgsm/lmeval_cli_x": {"command": "python -m bcg.eval"}})
    (run,) = index_results.collect(repo / "results")
    assert (run.gpu, run.torch, run.transformers, run.command, run.date) == (
        "H200", "2.11.0+cu130", "5.17.0", "python -m bcg.eval", "2026-11-29 00:10")


def test_a_readme_without_the_glance_markers_is_refused():
    with pytest.raises(ValueError, match="glance"):
        index_results.with_glance("# no table here\n", "| a |\n")

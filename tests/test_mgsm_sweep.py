"""scripts/mgsm_sweep.py on CPU: a tiny saved model through bcg.eval's comparison; results files and exit status."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from test_eval import DATA_DIR, save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import mgsm_sweep

import bcg.eval

LIMIT = 3
BATCH_SIZES = [1, 3]

pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="no local MGSM data (see tasks/mgsm_en_local/utils.py)")


def test_sweep_writes_results_and_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    model_dir = save_tiny_model(tmp_path / "model")
    # Only the tasks in tasks/: indexing all of lm-eval's takes ~10 s and is covered by test_eval's CLI run.
    monkeypatch.setattr(bcg.eval, "TaskManager", partial(bcg.eval.TaskManager, include_defaults=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core runners: torch's spinning threads stall against lm-eval's
    try:
        status = mgsm_sweep.main(["--model", str(model_dir), "--limit", str(LIMIT), "--batch-sizes",
                                  ",".join(map(str, BATCH_SIZES)), "--max-gen-toks", "12", "--backend", "eager",
                                  "--data-dir", str(DATA_DIR), "--device", "cpu", "--out-dir", str(tmp_path / "r"),
                                  "--out-name", "sweep", "--log-samples", "--mode", "exact,fast"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "r" / "sweep.json").read_text())
    assert status == 0, result["acceptance_failures"]
    assert "NOT speed figures" in result["caveat"]
    tasks = mgsm_sweep.DEFAULT_TASKS.split(",")
    assert [(r["task"], r["batch_size"], r["mode"], r["n"]) for r in result["rows"]] == [
        (task, bs, mode, LIMIT) for bs in BATCH_SIZES for mode in ("exact", "fast") for task in tasks]
    assert all(r["identical"] == 1.0 for r in result["rows"])  # fp32 on the eager backend: both modes exact
    assert result["accept"] == {"exact": "exact", "fast": "score"}
    assert result["bcg_stats"]["bs1/exact"]["replays"] > 0 and result["bcg_stats"]["bs3/fast"]["replays"] > 0
    assert (tmp_path / "r" / "sweep.md").is_file() and (tmp_path / "r" / "sweep_samples.json").is_file()


def test_model_args_and_names() -> None:
    args = mgsm_sweep.parse_args(["--model", "/m/smol/", "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "--device", "cuda", "--mode", "exact"])
    assert mgsm_sweep.model_args(args) == {
        "pretrained": "/m/smol/", "dtype": "bfloat16", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert mgsm_sweep.default_out_name(args) == "mgsm_smol_SmolLM2-135M-Instruct.Q4_1"
    assert args.limit is None and mgsm_sweep.modes(args) == ["exact"]
    for flag, value in (("true", True), ("false", False)):
        static = mgsm_sweep.parse_args(["--model", "m", "--device", "cpu", "--static-cache", flag])
        assert mgsm_sweep.model_args(static)["static_cache"] is value
    for bad in ("exact,exact", "quick", ","):
        with pytest.raises(ValueError, match="modes must be distinct values"):
            mgsm_sweep.modes(mgsm_sweep.parse_args(["--model", "m", "--mode", bad]))

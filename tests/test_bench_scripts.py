"""The benchmark scripts run end to end on the tiny preset (CPU, bcg's eager backend) and write sane results."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_capture  # noqa: E402
import bench_decode  # noqa: E402
import bench_prefill  # noqa: E402
import benchutil  # noqa: E402
import torch  # noqa: E402

import bcg  # noqa: E402


def _rows(path: Path) -> list[dict]:
    payload = json.loads(path.read_text())
    assert payload["rows"], f"{path} has no rows"
    assert payload["machine"]["torch"] and payload["command"]
    return payload["rows"]


def _plotted(path: Path) -> bool:
    """The PNG exists, or matplotlib (an optional 'bench' extra) is missing and the script said so."""
    return path.exists() or importlib.util.find_spec("matplotlib") is None


def _written(printed: str) -> list[str]:
    """The paths a run names at its end, after its ``results written:`` line (nothing may follow them)."""
    tail = printed.rstrip("\n").split("results written:\n")[-1].splitlines()
    assert tail and all(line.startswith("  ") for line in tail), printed[-500:]
    return [line.strip() for line in tail]


def test_bench_prefill_tiny(tmp_path, capsys):
    code = bench_prefill.main(["--model", "tiny", "--device", "cpu", "--requests", "1", "3", "--lengths", "8",
                               "--warmup", "2", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    names = ["prefill_tiny.json", "prefill_tiny.md"] + (["prefill_tiny.png"] if (tmp_path / "prefill_tiny.png").exists()
                                                        else [])
    assert _written(capsys.readouterr().out) == [str(tmp_path / name) for name in names]
    rows = _rows(tmp_path / "prefill_tiny.json")
    assert [(r["requests"], r["mean_len"]) for r in rows] == [(1, 8), (3, 8)]
    for row in rows:  # all inside the captured range: every call replays, none is rejected
        assert row["check"] == "ok" and row["rejects"] == "0" and row["replays"] == "2/2"
        assert row["argmax_agree"] == 1.0 and row["max_abs_diff"] == 0.0
        assert row["real_tokens"] <= row["bucket"] and row["real_tokens"] <= row["tokens"]  # bcg buckets real tokens
    assert (tmp_path / "prefill_tiny.md").exists()
    assert _plotted(tmp_path / "prefill_tiny.png")


def test_bench_prefill_beyond_max_num_tokens_is_flagged_as_expected(tmp_path):
    code = bench_prefill.main(["--model", "tiny", "--device", "cpu", "--requests", "4", "--lengths", "8",
                               "--max-num-tokens", "16", "--warmup", "1", "--repeats", "2",
                               "--out-dir", str(tmp_path)])
    assert code == 0
    (row,) = _rows(tmp_path / "prefill_tiny.json")
    assert row["bucket"] == "eager" and row["rejects"] == "too_many_tokens:2" and row["check"] == "ok"


def test_bench_prefill_failed_check_exits_non_zero(tmp_path, monkeypatch, capsys):
    """A row whose check fails is named on the console and makes the script exit non-zero."""
    monkeypatch.setattr(bench_prefill, "expected_stats", lambda *args, **kwargs: (-1, {}))
    code = bench_prefill.main(["--model", "tiny", "--device", "cpu", "--requests", "1", "--lengths", "8",
                               "--warmup", "1", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert code == 1
    (row,) = _rows(tmp_path / "prefill_tiny.json")
    assert row["check"] == "UNEXPECTED"
    assert "UNEXPECTED: requests 1, mean_len 8: replays 1/1" in capsys.readouterr().out


def test_check_fails_on_counters_and_on_eager_backend_differences():
    stats = benchutil.StatsDelta(replays=3, rejects={}, capture_seconds=0.0, graph_bytes=0)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert benchutil.check(stats, (3, {}), identical=True, device=cpu) == "ok"
    assert benchutil.check(stats, (0, {"too_many_tokens": 3}), identical=True, device=cpu) == "UNEXPECTED"
    assert benchutil.check(stats, (3, {}), identical=False, device=cpu) == "DIFFERS"
    assert benchutil.check(stats, (3, {}), identical=False, device=gpu) == "ok"  # bf16 kernels may round otherwise


def test_contenders_default_to_eager_and_bcg_without_the_breaks_peer():
    names = [c.name for c in benchutil.contenders(exact=False, compiled=True)]
    assert names == ["eager", "hf-compile", "bcg"]
    assert [c.name for c in benchutil.contenders(exact=True)] == ["eager", "bcg", "bcg-exact"]
    assert bench_decode.parse_args([]).breaks is False


def test_bench_decode_tiny(tmp_path):
    code = bench_decode.main(["--model", "tiny", "--device", "cpu", "--batches", "1", "2", "--contexts", "8",
                              "--new-tokens", "3", "--repeats", "1", "--breaks", "--out-dir", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "decode_tiny.json").read_text())
    rows = _rows(tmp_path / "decode_tiny.json")
    assert [(r["batch"], r["contender"]) for r in rows] == [
        (b, c) for b in (1, 2) for c in ("eager", "hf-compile", "bcg", "bcg-breaks")]
    for row in rows:
        assert row["check"] == "ok" and row["same_tokens"] == 1.0
    for row in (r for r in rows if r["contender"] in ("bcg", "bcg-breaks")):
        # one timed generate(3) and one generate(1): 2 prefills + 2 decode steps, all replayed
        assert row["rejects"] == "0" and row["replays"] == 4
    assert list(payload["bcg_final_stats"]) == ["bcg", "bcg-breaks"]
    assert _plotted(tmp_path / "decode_tiny.png")


def test_bench_decode_multi_request_prompts_of_spread_lengths(tmp_path):
    """--spread: left-padded prompts of seeded lengths, as multi-request generation runs them; bcg packs the prefill
    and replays every step with eager's tokens."""
    code = bench_decode.main(["--model", "tiny", "--device", "cpu", "--batches", "4", "--contexts", "8", "--spread",
                              "0.5", "--new-tokens", "3", "--repeats", "1", "--skip-compile", "--out-dir",
                              str(tmp_path), "--out-name", "spread"])
    assert code == 0
    payload = json.loads((tmp_path / "spread.json").read_text())
    assert payload["settings"]["spread"] == 0.5
    shape = bench_decode.make_shape(4, 8, 512, 0, 0.5, 0, torch.device("cpu"))
    assert shape.real_tokens < shape.batch * shape.padded_length  # the prompts really are padded
    for row in _rows(tmp_path / "spread.json"):
        assert row["check"] == "ok" and row["same_tokens"] == 1.0
        assert row["contender"] == "eager" or (row["rejects"] == "0" and row["replays"] == 4)


def test_bench_capture_tiny(tmp_path, capsys):
    assert bench_capture.main(["--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path / "capture_tiny.json")
    assert row["failures"] == 0 and row["sizes"] > 0
    assert _written(capsys.readouterr().out) == [str(tmp_path / f"capture_tiny.{ext}") for ext in ("json", "md")]


@pytest.mark.parametrize("script, folder", [
    ("bench_prefill", "prefill"), ("bench_decode", "decode"), ("bench_capture", "capture"), ("mgsm_sweep", "mgsm"),
    ("bench_varlen_attention", "varlen_attention"), ("sweep_architectures", "sweep_architectures"),
])
def test_each_benchmark_writes_to_its_own_results_folder_by_default(script, folder, capsys):
    """results/ holds one folder per benchmark (scripts/index_results.py indexes them): each script's --out-dir."""
    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    assert f"(default: results/{folder}/)" in " ".join(capsys.readouterr().out.split())


def test_bench_prefill_without_gpu_defaults_to_the_quick_check(tmp_path, capsys):
    """No GPU and no --model: the tiny quick grid, labelled everywhere as no speed figures, without speedups."""
    assert bench_prefill.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "prefill_tiny.json").read_text())
    quick = bench_prefill.QUICK
    assert payload["model"]["model"] == "tiny"
    assert [(r["requests"], r["mean_len"]) for r in payload["rows"]] == [
        (r, n) for r in quick["requests"] for n in quick["lengths"]]
    assert (payload["settings"]["warmup"], payload["settings"]["repeats"]) == (quick["warmup"], quick["repeats"])
    assert all(r["check"] == "ok" and "speedup" not in r for r in payload["rows"])
    printed, markdown = capsys.readouterr().out, (tmp_path / "prefill_tiny.md").read_text()
    assert "quick check" in printed
    assert str(tmp_path / "prefill_tiny.json") in _written(printed)  # the newcomer's first run says where it wrote
    for text in (payload["caveat"], payload["title"], markdown, printed):
        assert "NOT speed figures" in text
    assert "speedup |" not in markdown and "speedup |" not in printed  # no speedup column in the tables


def test_sweep_architectures_classifies_types_and_fails_on_a_mismatch(tmp_path, monkeypatch):
    import sweep_architectures

    assert sweep_architectures.main(["--types", "llama", "mamba", "--jobs", "2", "--out-dir", str(tmp_path)]) == 0
    outcomes = {r["model_type"]: r["outcome"] for r in _rows(tmp_path / "sweep_architectures.json")}
    assert outcomes == {"llama": "replays", "mamba": "fallback"}
    static = ["--generate", '{"cache_implementation": "static"}', "--out-name", "static"]
    assert sweep_architectures.main(["--types", "llama", "--out-dir", str(tmp_path), *static]) == 0
    (row,) = _rows(tmp_path / "static.json")
    assert row["outcome"] == "replays" and row["full_graph_replays"] == 4  # five tokens: four decode steps

    def wrong_logits(self, *args, **kwargs):  # a wrapped stack that answers differently from eager
        output = self.runner_forward(*args, **kwargs)
        output.last_hidden_state.add_(1.0)
        return output

    original_wrap = bcg.wrap_model

    def wrap_badly(model, **kwargs):
        handle = original_wrap(model, **kwargs)
        stack = handle._restore.stack
        stack.runner_forward = stack.forward
        stack.forward = wrong_logits.__get__(stack)
        return handle

    monkeypatch.setattr(sweep_architectures.bcg, "wrap_model", wrap_badly)
    assert sweep_architectures.main(["--types", "llama", "--out-dir", str(tmp_path), "--out-name", "bad"]) == 1
    (row,) = _rows(tmp_path / "bad.json")
    assert row["outcome"] == "MISMATCH"


def test_bench_varlen_attention_methods_agree_and_a_wrong_one_fails(tmp_path, monkeypatch):
    import bench_varlen_attention as varlen

    args = ["--device", "cpu", "--requests", "3", "--lengths", "12", "--repeats", "1", "--warmup", "0",
            "--out-dir", str(tmp_path)]
    assert varlen.main(args) == 0
    rows = {r["method"]: r for r in _rows(tmp_path / "varlen_attention.json")}
    for method in ("per-request", "padded", "flex"):  # what runs on any CPU; nested and flash-varlen need CUDA
        assert rows[method]["max_abs_diff"] <= 1e-4 and rows[method]["ms"] > 0, rows[method]
    monkeypatch.setitem(varlen.METHODS, "padded", lambda p: varlen.padded(p) + 1)
    assert varlen.main([*args, "--out-name", "wrong"]) == 1

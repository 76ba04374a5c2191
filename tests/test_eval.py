"""bcg.eval on CPU: the ``bcg`` lm-eval model type through ``python -m bcg.eval``, and the eager-vs-bcg comparison.

A tiny random Llama and a tokenizer trained in-process are saved to a temporary folder, so lm-eval loads them the
way it loads any model; the local MGSM tasks in ``tasks/`` read the JSONL files shipped beside them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from tiny_models import tiny_model
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "tasks"


def _load_task_utils() -> ModuleType:
    """The local tasks' own data loader, tasks/mgsm_en_local/utils.py, under a name of its own."""
    spec = importlib.util.spec_from_file_location("mgsm_en_local_utils", TASKS_DIR / "mgsm_en_local" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mgsm_local = _load_task_utils()
try:
    DATA_DIR: Path | None = mgsm_local.find_data_dir()
except FileNotFoundError:
    DATA_DIR = None
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: tiny_models' pad/bos/eos ids are 0, 1, 2
TASKS = "mgsm_direct_en_local,mgsm_choice_en_local"  # a generate_until task and a log-likelihood task
LIMIT = 4
GEN = "max_gen_toks=12"
SEED = 1  # a random init whose greedy answers are not all an immediate EOS, so there is something to compare

pytestmark = pytest.mark.skipif(DATA_DIR is None, reason=f"no MGSM data in any of {mgsm_local.DEFAULT_DATA_DIRS}")


def mgsm_texts() -> list[str]:
    texts = []
    for split in ("test", "train"):
        with open(DATA_DIR / f"mgsm_en_{split}.jsonl") as f:
            for line in f:
                doc = json.loads(line)
                texts.append(f"Question: {doc['question']}\nAnswer: {doc['answer'] or ''} {doc['answer_number']}")
    return texts


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on the MGSM text, so decoding round-trips newlines and stop strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(mgsm_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_model(folder: Path, seed: int = SEED) -> Path:
    """A tiny Llama and its tokenizer, saved as ``from_pretrained`` (and lm-eval's ``pretrained=``) expects them."""
    tokenizer = train_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def local_tasks():
    """The tasks in tasks/ alone: indexing lm-eval's thousands of task files takes ~10 s, once per TaskManager."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """On a 2-core runner torch's spinning worker threads stall against lm-eval's own for seconds per call."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_local_tasks_read_the_files() -> None:
    data = mgsm_local.load_mgsm_en()
    assert (len(data["test"]), len(data["train"])) == (250, 8)
    choices = mgsm_local.add_choices(data["test"])
    for doc in choices.select(range(20)):
        assert len(set(doc["choices"])) == 4 and doc["choices"][doc["gold"]] == str(doc["answer_number"])
    with pytest.raises(FileNotFoundError, match="data_dir"):
        mgsm_local.load_mgsm_en(data_dir="/nonexistent")


def test_a_fresh_clone_reads_the_shipped_data() -> None:
    """The README's eval example runs as written: the tasks find MGSM in the checkout, its license beside it."""
    shipped = TASKS_DIR / "mgsm_en_local" / "data"
    assert DATA_DIR == shipped == mgsm_local.DEFAULT_DATA_DIRS[0]
    assert "Attribution 4.0" in (shipped / "LICENSE").read_text()
    assert "CC BY 4.0" in (shipped / "README.md").read_text()


def test_cli_run_writes_scores_and_bcg_stats(model_dir: Path, tmp_path: Path) -> None:
    """``python -m bcg.eval`` is lm-eval's CLI: its flags, its output folder, bcg's figures under config.bcg."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # bcg, installed or not
    cmd = [sys.executable, "-m", "bcg.eval", "--model", "bcg", "--model_args",
           f"pretrained={model_dir},backend=eager,mode=exact", "--tasks", TASKS, "--include_path",
           str(TASKS_DIR), "--limit", str(LIMIT), "--batch_size", "2", "--gen_kwargs", GEN, "--device", "cpu",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["mgsm_direct_en_local"]["exact_match,flexible-extract"] >= 0
    assert results["results"]["mgsm_choice_en_local"]["acc,none"] >= 0
    info = results["config"]["bcg"]
    assert info["wrapped"] and info["options"]["mode"] == "exact"
    stats = info["stats"]
    assert stats["replays"] > 0 and stats["rejects"] == {} and stats["backend"] == "eager", stats
    generated, scored = info["requests"]["generate_until"], info["requests"]["loglikelihood"]
    assert generated["requests"] == LIMIT and generated["generated_tokens"] > 0 and generated["tokens_per_second"] > 0
    assert scored["requests"] == 4 * LIMIT and scored["forward_tokens"] > 0  # four choices per question
    assert len(list((tmp_path / "out").rglob("samples_mgsm_direct_en_local_*.jsonl"))) == 1


def test_cli_help_shows_lm_eval_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from bcg.eval import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model bcg" in out and "compare" in out  # bcg's lines
    for flag in ("--include_path", "--model_args", "--log_samples", "--apply_chat_template", "--output_path"):
        assert flag in out


def test_compare_accepts_bcg(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager and bcg's eager backend in fp32: the same responses and log-likelihoods; exit status 0."""
    from functools import partial

    import bcg.eval
    from bcg.eval import main

    monkeypatch.setattr(bcg.eval, "TaskManager", partial(bcg.eval.TaskManager, include_defaults=False))  # speed

    out = tmp_path / "compare.json"
    status = main(["compare", "--model_args", f"pretrained={model_dir},backend=eager", "--tasks", TASKS,
                   "--include_path", str(TASKS_DIR), "--limit", str(LIMIT), "--batch_size", "1,4", "--gen_kwargs",
                   GEN, "--device", "cpu", "--accept", "exact", "--output_path", str(out), "--log_samples"])
    result = json.loads(out.read_text())
    assert status == 0, result["acceptance_failures"]
    assert [(r["task"], r["batch_size"], r["mode"]) for r in result["rows"]] == [
        (task, bs, "fast") for bs in (1, 4) for task in TASKS.split(",")]
    for row in result["rows"]:
        assert row["n"] == LIMIT and row["agreement"] == 1.0
        assert all(eager == wrapped for eager, wrapped in row["scores"].values())
    loglik = [r for r in result["rows"] if r["task"] == "mgsm_choice_en_local"]
    assert all(r["loglik_max_abs_diff"] <= 1e-4 for r in loglik)
    assert {(s["request_type"], s["batch_size"]) for s in result["speed"]} == {
        (kind, bs) for kind in ("generate_until", "loglikelihood") for bs in (1, 4)}
    assert all(s["eager_tok_s"] > 0 and s["bcg_tok_s"] > 0 for s in result["speed"])
    assert all(stats["replays"] > 0 and not stats["rejects"] for stats in result["bcg_stats"].values())
    # Agreement means something only if the model generated text.
    texts = result["responses"]["mgsm_direct_en_local/bs1/fast"]["eager"].values()
    assert sum(bool(t[0]) for t in texts) >= LIMIT // 2


def test_compare_rejects_different_models(model_dir: Path, tmp_path: Path, local_tasks) -> None:
    """Two different models through the same comparison: ``exact`` fails, naming agreement and log-likelihoods."""
    from lm_eval import simple_evaluate

    from bcg.eval import BcgLM, Comparison, acceptance_failures, add_runs

    other = save_tiny_model(tmp_path / "other", seed=SEED + 1)
    runs = [simple_evaluate(model=BcgLM(str(d), wrap=False, device="cpu", batch_size=4), tasks=TASKS.split(","),
                            task_manager=local_tasks, limit=LIMIT, gen_kwargs=GEN, bootstrap_iters=0)
            for d in (model_dir, other)]
    comparison = Comparison()
    add_runs(comparison, *runs, batch_size=4, mode="exact")
    failures = acceptance_failures(comparison, "exact")
    assert any("identical responses" in f for f in failures), failures
    assert any("log-likelihoods differ" in f for f in failures), failures
    # A score 0.25 apart fails the score acceptance; the same scores pass it.
    comparison.rows[0]["scores"] = {"exact_match,flexible-extract": [0.5, 0.25]}
    comparison.rows[1]["scores"] = {"acc,none": [0.5, 0.5]}
    assert [f.split(":")[0] for f in acceptance_failures(comparison, "score")] == [
        "mgsm_direct_en_local bs=4 exact (score)"]
    assert acceptance_failures(comparison, {"exact": "score"}) == acceptance_failures(comparison, "score")
    with pytest.raises(ValueError, match="accept must be one of"):
        acceptance_failures(comparison, "close")


@pytest.mark.parametrize("model_args, acceptance", [
    ({}, "score"),
    ({"mode": "exact"}, "exact"),
    ({"mode": "exact", "attention_kernels": "fast"}, "score"),
    ({"mode": "fast", "attention_kernels": "eager", "fused_kernels": False}, "score"),  # static stand-ins
    ({"mode": "fast", "attention_kernels": "eager", "fused_kernels": False, "static_cache": False}, "exact"),
    ({"mode": "exact", "static_cache": True}, "score"),
])
def test_default_acceptance_follows_the_kernels_chosen(model_args, acceptance) -> None:
    from bcg.eval import acceptances, default_acceptance

    assert default_acceptance(model_args) == acceptance
    mode = model_args.get("mode", "fast")
    overrides = {k: v for k, v in model_args.items() if k != "mode"}
    assert acceptances(overrides, [mode]) == {mode: acceptance}
    assert acceptances(overrides, [mode], "exact") == {mode: "exact"}


def test_compare_modes_are_named_once_and_known() -> None:
    from bcg.eval import compare_modes

    assert compare_modes({}, None) == ["fast"]
    assert compare_modes({"mode": "exact"}, None) == ["exact"]
    assert compare_modes({}, ["exact", "fast"]) == ["exact", "fast"]
    with pytest.raises(ValueError, match="name the modes once"):
        compare_modes({"mode": "exact"}, ["fast"])
    for bad in ([], ["fast", "fast"], ["quick"]):
        with pytest.raises(ValueError, match="modes must be distinct"):
            compare_modes({}, bad)

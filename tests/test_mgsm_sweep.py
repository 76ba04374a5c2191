"""The MGSM sweep's code path on CPU: a tiny random model, eager vs bcg's eager backend, must agree exactly."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import mgsm_sweep

DATA_DIR = mgsm_sweep.DEFAULT_DATA_DIR
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: tiny_models' pad/bos/eos ids are 0, 1, 2
TASKS = ["mgsm_direct_en", "mgsm_native_cot_en"]
BATCH_SIZES = [1, 4]
LIMIT = 6
MAX_GEN_TOKS = 16
SEED = 1  # a random init whose greedy answers are not all an immediate EOS, so there is something to compare

pytestmark = pytest.mark.skipif(DATA_DIR is None, reason=f"no MGSM data in any of {mgsm_sweep.DATA_DIRS}")


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


@pytest.fixture(scope="module")
def result() -> Iterator[mgsm_sweep.SweepResult]:
    import torch
    from lm_eval.tasks import TaskManager

    tokenizer = train_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024, seed=SEED)
    manager = TaskManager()
    configs = [mgsm_sweep.task_config(manager, task, DATA_DIR, max_gen_toks=MAX_GEN_TOKS) for task in TASKS]
    docs = mgsm_sweep.load_docs(DATA_DIR, 8)
    # On a 2-core runner torch's spinning worker threads stall against lm-eval's own for seconds per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield mgsm_sweep.sweep(model, tokenizer, configs, BATCH_SIZES, LIMIT, docs, loglik_samples=8,
                               backend="eager", manager=manager, progress=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def test_responses_identical(result: mgsm_sweep.SweepResult) -> None:
    assert [(r["task"], r["batch_size"], r["n"]) for r in result.rows] == [
        (task, bs, LIMIT) for bs in BATCH_SIZES for task in TASKS]
    for r in result.rows:
        assert r["agreement"] == 1.0, result.disagreements
        assert r["eager_flex"] == r["bcg_flex"]
        assert r.get("eager_strict") == r.get("bcg_strict")
    assert "eager_strict" in result.rows[1]  # the CoT task reports strict-match too
    assert not mgsm_sweep.acceptance_failures(result.rows)


def test_bcg_replayed(result: mgsm_sweep.SweepResult) -> None:
    for r in result.rows:
        assert r["replays"] > 0, r
    assert result.bcg_stats["backend"] == "eager"
    assert result.bcg_stats["invalidations"] == 0


def test_loglikelihoods_equal(result: mgsm_sweep.SweepResult) -> None:
    for bs, check in result.loglik.items():
        assert check["n"] == 8
        assert check["max_abs_diff"] <= 1e-4, (bs, check)
        assert check["greedy_agreement"] == 1.0
        assert check["bcg"]["replays"] > 0, check


def test_responses_not_trivial(result: mgsm_sweep.SweepResult) -> None:
    """Agreement only means something if the model actually generated text."""
    for key, both in result.responses.items():
        assert sum(bool(text) for text in both["eager"].values()) >= LIMIT // 2, (key, both)
    for r in result.rows:
        assert r["eager_tok_s"] > 0 and r["bcg_tok_s"] > 0

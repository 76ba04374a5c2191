"""Local MGSM English for lm-eval: the tasks in this folder read the JSONL files, never the hub.

The data folder is ``--metadata data_dir=DIR`` when given (lm-eval passes task metadata to ``custom_dataset``),
else the first of ``data/`` beside this file (shipped with the tasks: MGSM English, CC BY 4.0, see data/README.md),
``<repo>/.data/mgsm`` and ``<repo>/../shared/data/mgsm`` that holds ``mgsm_en_test.jsonl``: paths are found from
this file, so the tasks work from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The shipped copy first, so a fresh clone needs nothing else; the other two are older local layouts.
DEFAULT_DATA_DIRS = (HERE / "data", REPO / ".data" / "mgsm", REPO.parent / "shared" / "data" / "mgsm")
SPLITS = ("test", "train")  # 250 questions; 8 exemplars for few-shot
# Explicit types: the test split's all-null ``answer`` would otherwise not cast to the train split's strings.
FEATURES = datasets.Features({
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "answer_number": datasets.Value("int64"),
    "equation_solution": datasets.Value("string"),
})


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else the first default folder holding ``mgsm_en_test.jsonl``."""
    candidates = [Path(data_dir)] if data_dir else list(DEFAULT_DATA_DIRS)
    for folder in candidates:
        if (folder / "mgsm_en_test.jsonl").is_file():
            return folder
    raise FileNotFoundError(
        f"no mgsm_en_test.jsonl in {', '.join(map(str, candidates))}; pass the folder holding the MGSM JSONL files "
        "as --metadata data_dir=DIR (lm-eval's CLI) or TaskManager(metadata={'data_dir': DIR})"
    )


def load_mgsm_en(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``custom_dataset`` of the tasks here; lm-eval passes every metadata key, of which only ``data_dir`` is read."""
    folder = find_data_dir(data_dir)
    splits = {}
    for split in SPLITS:
        with open(folder / f"mgsm_en_{split}.jsonl", encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()],
                                                       features=FEATURES)
    return datasets.DatasetDict(splits)


def distractors(gold: int) -> list[int]:
    """Three wrong answers near the gold one: +1, -1, x2, +2, +10, the first three distinct and non-negative."""
    wrong: list[int] = []
    for n in (gold + 1, gold - 1, gold * 2, gold + 2, gold + 10):
        if n >= 0 and n != gold and n not in wrong:
            wrong.append(n)
    return wrong[:3]


def add_choices(dataset: datasets.Dataset) -> datasets.Dataset:
    """``process_docs`` of the multiple-choice task: the gold number among its distractors, in numeric order."""

    def choices(doc: dict[str, Any]) -> dict[str, Any]:
        numbers = sorted([doc["answer_number"], *distractors(doc["answer_number"])])
        return {"choices": [str(n) for n in numbers], "gold": numbers.index(doc["answer_number"])}

    return dataset.map(choices)

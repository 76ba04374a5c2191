"""MGSM accuracy sweep: one model through lm-eval eagerly, then wrapped by bcg; scores, speed and agreement.

Both runs use the same model object in one process (wrapped after the eager run), the same batch size and
no lm-eval caches, so every bcg answer is generated fresh. Log-likelihoods are compared too: lm-eval scores
them with a right-padded batch and no attention mask, a different path through the model than generation.

    python scripts/mgsm_sweep.py --model Qwen/Qwen2.5-0.5B --tasks mgsm_direct_en,mgsm_native_cot_en
    python scripts/mgsm_sweep.py --model DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --max-gen-toks 64 \
        --attention-kernels eager      # results/mgsm_smollm2-135m-instruct_eager-kernels.md

With the default ``--attention-kernels fast`` bcg's breaks keep SDPA off cuDNN; bf16 greedy text then differs
from eager's wherever the attention kernel matters. ``eager`` lets SDPA choose as eager does: answers match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from benchutil import (
    StatsDelta,
    announce_device,
    format_rejects,
    results_name,
    snapshot,
    speed_caveat,
    speed_columns,
    stats_since,
    timed,
)
from report import RESULTS_DIR, write_results

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shared data beside the checkout does not travel to a GPU machine; a copy carried in .data/ does.
DATA_DIRS = (REPO_ROOT / ".data" / "mgsm", REPO_ROOT.parent / "shared" / "data" / "mgsm")
DEFAULT_DATA_DIR = next((d for d in DATA_DIRS if (d / "mgsm_en_test.jsonl").is_file()), None)
MAX_DISAGREEMENTS = 20
MIN_AGREEMENT = 0.98
MAX_SCORE_DIFF = 0.01
# Filters reported as score columns: flexible-extract exists in every MGSM task, strict-match in the CoT ones.
SCORE_FILTERS = {"flex": "flexible-extract", "strict": "strict-match"}

Log = Callable[[str], None]


def log(message: str) -> None:
    print(f"[mgsm_sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----- tasks and data -----
def mgsm_features() -> Any:
    """Explicit column types: the test split's all-null ``answer`` would otherwise not cast to the train split's."""
    import datasets

    return datasets.Features({
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_number": datasets.Value("int64"),
        "equation_solution": datasets.Value("string"),
    })


def data_files(data_dir: Path, language: str) -> dict[str, str]:
    """The local JSONL splits for one MGSM language (test required, train only used for few-shot)."""
    files = {split: data_dir / f"mgsm_{language}_{split}.jsonl" for split in ("test", "train")}
    if not files["test"].is_file():
        raise FileNotFoundError(f"{files['test']} not found; pass --data-dir with mgsm_{language}_test.jsonl")
    return {split: str(path) for split, path in files.items() if path.is_file()}


def task_config(manager: Any, name: str, data_dir: Path | None, max_gen_toks: int | None) -> dict[str, Any]:
    """lm-eval's own config for task ``name`` as an inline dict, optionally reading local MGSM files offline."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        known = ", ".join(t for t in manager.all_subtasks if t.startswith("mgsm") and t.endswith("_en"))
        raise SystemExit(f"unknown lm-eval task {name!r}; English MGSM tasks: {known}")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    if data_dir is not None:
        files = data_files(data_dir, config["dataset_name"])
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": files, "features": mgsm_features()})
        if "train" not in files:
            config["training_split"] = None
    if max_gen_toks is not None:
        config["generation_kwargs"] = {**config.get("generation_kwargs", {}), "max_gen_toks": max_gen_toks}
    return config


def load_docs(data_dir: Path | None, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` English MGSM test documents, for the log-likelihood check and the warm-up."""
    if data_dir is not None:
        with open(data_files(data_dir, "en")["test"]) as f:
            return [json.loads(line) for line in islice(f, limit)]
    import datasets

    return list(datasets.load_dataset("juletxara/mgsm", "en", split=f"test[:{limit}]"))


def prompt(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def loglik_pairs(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(context, continuation) pairs that score the whole question and answer: every position is checked."""
    return [("Question:", f" {doc['question']}\nAnswer: {doc['answer_number']}") for doc in docs]


# ----- measuring one run -----
@dataclass
class GenerateTimer:
    """Wall time and newly generated non-pad tokens over every ``model.generate`` call."""

    seconds: float = 0.0
    new_tokens: int = 0


@contextmanager
def timed_generate(model: torch.nn.Module) -> Iterator[GenerateTimer]:
    """Intercept ``model.generate`` (lm-eval reports no throughput), synchronising CUDA around each call."""
    timer = GenerateTimer()
    original = model.generate
    instance_generate = model.__dict__.get("generate")  # e.g. another wrapper's; put back as found
    device = next(model.parameters()).device

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        pad_id = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
        seconds, output = timed(lambda: original(*args, **kwargs), device)
        timer.seconds += seconds
        new = output[:, input_ids.shape[1]:]
        timer.new_tokens += int((new != pad_id).sum()) if pad_id is not None else new.numel()
        return output

    model.generate = generate
    try:
        yield timer
    finally:
        if instance_generate is None:
            del model.generate  # the class method shows through again
        else:
            model.generate = instance_generate


@dataclass
class TaskRun:
    """One lm-eval run of one task at one batch size."""

    scores: dict[str, float]  # filter name -> exact_match
    responses: dict[int, str]  # doc_id -> raw model response
    timer: GenerateTimer
    bcg: StatsDelta | None  # wrapped runs only

    def tokens_per_second(self) -> float:
        # Graph capture during the run is a one-off cost, not generation speed: leave it out.
        capture = self.bcg.capture_seconds if self.bcg else 0.0
        seconds = self.timer.seconds - capture
        return self.timer.new_tokens / seconds if seconds > 0 else float("nan")


def run_task(lm: Any, config: dict[str, Any], limit: int | None, manager: Any, handle: Any = None) -> TaskRun:
    """Evaluate one task through ``simple_evaluate`` with every lm-eval cache off."""
    from lm_eval import simple_evaluate

    before = snapshot(handle)
    with timed_generate(lm.model) as timer:
        out = simple_evaluate(model=lm, tasks=[config], limit=limit, log_samples=True, use_cache=None,
                              cache_requests=False, bootstrap_iters=0, task_manager=manager)
    name = config["task"]
    metrics = out["results"][name]
    scores = {f: float(metrics[f"exact_match,{f}"]) for f in SCORE_FILTERS.values() if f"exact_match,{f}" in metrics}
    # log_samples lists each doc once per filter; the raw response is the same in all of them.
    responses = {s["doc_id"]: s["resps"][0][0] for s in out["samples"][name]}
    return TaskRun(scores, responses, timer, stats_since(handle, before))


def loglikelihoods(lm: Any, pairs: list[tuple[str, str]], handle: Any = None) -> dict[str, Any]:
    """``HFLM.loglikelihood`` over ``pairs``: lm-eval's own right-padded, mask-free forward calls."""
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    before = snapshot(handle)
    results = lm.loglikelihood(requests, disable_tqdm=True)
    delta = stats_since(handle, before)
    return {"values": [ll for ll, _ in results], "greedy": [greedy for _, greedy in results],
            "bcg": asdict(delta) if delta else None}


def warm_up(model: torch.nn.Module, tokenizer: Any, docs: list[dict[str, Any]], batch_size: int) -> None:
    """One short generate at ``batch_size``; under bcg it captures the decode graph and a prefill graph."""
    prompts = [prompt(docs[i % len(docs)]) for i in range(batch_size)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding="longest").to(model.device)
    finally:
        tokenizer.padding_side = side
    model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)


# ----- the sweep -----
@dataclass
class Phase:
    """Every run of one phase (eager or bcg), keyed by (task, batch size) and by batch size."""

    tasks: dict[tuple[str, int], TaskRun]
    loglik: dict[int, dict[str, Any]]


def run_phase(name: str, model: torch.nn.Module, tokenizer: Any, configs: list[dict[str, Any]],
              batch_sizes: list[int], limit: int | None, pairs: list[tuple[str, str]], manager: Any,
              docs: list[dict[str, Any]], handle: Any = None, progress: Log = log) -> Phase:
    from lm_eval.models.huggingface import HFLM

    phase = Phase({}, {})
    for bs in batch_sizes:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs)
        # Both phases warm up untimed: first-call costs (CUDA/cuBLAS init, bcg's capture) are not generation speed.
        progress(f"{name}: warm-up at batch size {bs}")
        warm_up(model, tokenizer, docs, bs)
        for config in configs:
            progress(f"{name}: {config['task']} at batch size {bs}")
            run = run_task(lm, config, limit, manager, handle)
            phase.tasks[config["task"], bs] = run
            progress(f"{name}: {config['task']} bs={bs} scores={run.scores} "
                     f"{run.timer.new_tokens} tokens in {run.timer.seconds:.2f} s"
                     + (f"; bcg replays={run.bcg.replays} rejects={format_rejects(run.bcg.rejects)} "
                        f"capture={run.bcg.capture_seconds:.2f} s" if run.bcg else ""))
        if pairs:
            progress(f"{name}: {len(pairs)} log-likelihoods at batch size {bs}")
            phase.loglik[bs] = loglikelihoods(lm, pairs, handle)
    return phase


def compare_loglik(eager: dict[str, Any], wrapped: dict[str, Any]) -> dict[str, Any]:
    """Largest and mean absolute difference of the summed log-probs, and how often is-greedy agrees."""
    diffs = [abs(a - b) for a, b in zip(eager["values"], wrapped["values"], strict=True)]
    same = [a == b for a, b in zip(eager["greedy"], wrapped["greedy"], strict=True)]
    return {"n": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "greedy_agreement": sum(same) / len(same), "bcg": wrapped["bcg"]}


def disagreements(eager: TaskRun, wrapped: TaskRun) -> list[dict[str, Any]]:
    if eager.responses.keys() != wrapped.responses.keys():
        raise RuntimeError("eager and bcg runs evaluated different documents")
    return [{"doc_id": d, "eager": eager.responses[d], "bcg": wrapped.responses[d]}
            for d in sorted(eager.responses) if eager.responses[d] != wrapped.responses[d]]


def row(task: str, bs: int, eager: TaskRun, wrapped: TaskRun, differing: int, loglik: dict[str, Any] | None,
        device: torch.device) -> dict[str, Any]:
    """One table row: scores side by side, agreement, throughput, what bcg did, the log-likelihood check."""
    n = len(eager.responses)
    out: dict[str, Any] = {"task": task, "batch_size": bs, "n": n}
    for short, name in SCORE_FILTERS.items():
        if name in eager.scores:
            out[f"eager_{short}"] = eager.scores[name]
            out[f"bcg_{short}"] = wrapped.scores[name]
    eager_tps, bcg_tps = eager.tokens_per_second(), wrapped.tokens_per_second()
    out.update(
        agreement=(n - differing) / n,
        eager_tok_s=eager_tps,
        bcg_tok_s=bcg_tps,
        **speed_columns(device, speedup=bcg_tps / eager_tps),
        replays=wrapped.bcg.replays,
        rejects=format_rejects(wrapped.bcg.rejects),
        capture_s=wrapped.bcg.capture_seconds,
    )
    if loglik is not None:
        out.update(loglik_max_abs_diff=loglik["max_abs_diff"], loglik_greedy_agreement=loglik["greedy_agreement"])
    return out


def acceptance_failures(rows: list[dict[str, Any]]) -> list[str]:
    """The GPU acceptance criteria: scores within 0.01 and at least 98% identical responses."""
    failures = []
    for r in rows:
        where = f"{r['task']} bs={r['batch_size']}"
        for short in SCORE_FILTERS:
            if f"eager_{short}" in r and abs(r[f"eager_{short}"] - r[f"bcg_{short}"]) > MAX_SCORE_DIFF:
                failures.append(f"{where}: {short} score eager {r[f'eager_{short}']:.4f} vs bcg "
                                f"{r[f'bcg_{short}']:.4f} differs by more than {MAX_SCORE_DIFF}")
        if r["agreement"] < MIN_AGREEMENT:
            failures.append(f"{where}: response agreement {r['agreement']:.4f} < {MIN_AGREEMENT}")
    return failures


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    disagreements: dict[str, list[dict[str, Any]]]  # "<task>/bs<N>" -> every differing response
    loglik: dict[int, dict[str, Any]]
    bcg_stats: dict[str, Any]
    responses: dict[str, dict[str, dict[int, str]]]  # "<task>/bs<N>" -> {"eager"|"bcg": doc_id -> response}


def sweep(model: torch.nn.Module, tokenizer: Any, configs: list[dict[str, Any]], batch_sizes: list[int],
          limit: int | None, docs: list[dict[str, Any]], loglik_samples: int, backend: str | None,
          manager: Any, progress: Log = log, attention_kernels: str = "fast",
          fused_kernels: bool = False) -> SweepResult:
    """Eager runs first, then the same model wrapped by bcg; unwrapped again at the end."""
    import bcg

    pairs = loglik_pairs(docs[:loglik_samples])
    # HF must not compile either run: the eager baseline would not be eager, and bcg sets the same flag.
    model.generation_config.disable_compile = True
    eager = run_phase("eager", model, tokenizer, configs, batch_sizes, limit, pairs, manager, docs,
                      progress=progress)
    progress(f"wrapping with bcg (backend={backend}, attention_kernels={attention_kernels}, "
             f"fused_kernels={fused_kernels})")
    handle = bcg.wrap_model(model, backend=backend, attention_kernels=attention_kernels, fused_kernels=fused_kernels)
    try:
        wrapped = run_phase("bcg", model, tokenizer, configs, batch_sizes, limit, pairs, manager, docs, handle,
                            progress=progress)
        bcg_stats = handle.stats()
    finally:
        bcg.unwrap_model(model)

    rows, differing, responses = [], {}, {}
    loglik = {bs: compare_loglik(eager.loglik[bs], wrapped.loglik[bs]) for bs in eager.loglik}
    for (task, bs), eager_run in eager.tasks.items():
        key = f"{task}/bs{bs}"
        wrapped_run = wrapped.tasks[task, bs]
        differing[key] = disagreements(eager_run, wrapped_run)
        responses[key] = {"eager": eager_run.responses, "bcg": wrapped_run.responses}
        rows.append(row(task, bs, eager_run, wrapped_run, len(differing[key]), loglik.get(bs), model.device))
    return SweepResult(rows, differing, loglik, bcg_stats, responses)


# ----- command line -----
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model id or local path")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (needs the gguf package)")
    p.add_argument("--tasks", default="mgsm_direct_en",
                   help="comma-separated lm-eval tasks, e.g. mgsm_direct_en,mgsm_native_cot_en (default %(default)s)")
    p.add_argument("--limit", type=int, default=200, help="documents per task (default %(default)s)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="offline MGSM JSONL directory (default: the first of .data/mgsm, ../shared/data/mgsm that "
                        "exists, here %(default)s; None: lm-eval's hub dataset)")
    p.add_argument("--dtype", help="torch dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-gen-toks", type=int, help="override the task's generation length (lm-eval default 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, here %(default)s")
    p.add_argument("--backend", choices=["cuda", "eager"], help="bcg backend (default: bcg picks by device)")
    p.add_argument("--attention-kernels", choices=["fast", "eager"], default="fast",
                   help="SDPA kernels inside bcg's breaks: 'fast' (flash/efficient, bcg's default) or 'eager' "
                        "(SDPA's own pick, as in the eager run: token-identical on the same kernels)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="wrap with fused_kernels=True (Triton RMSNorm/rotary in the graphs; bf16 rounding may differ)")
    p.add_argument("--loglik-samples", type=int, default=32, help="log-likelihood requests to compare (0: skip)")
    p.add_argument("--out-name", help="results file stem (default mgsm_<model basename>)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="default %(default)s")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every eager and bcg response to <out-name>_samples.json")
    return p.parse_args(argv)


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    from lm_eval.models.utils import configure_pad_token
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **extra).to(args.device).eval()
    # The warm-up pads before lm-eval first sees the tokenizer: give it lm-eval's pad token up front.
    return model, configure_pad_token(tokenizer, model_config=model.config)


def default_out_name(args: argparse.Namespace) -> str:
    """``mgsm_<model basename>``, plus the GGUF file's stem: one directory may hold several quantisations."""
    name = Path(args.model.rstrip("/")).name
    return results_name("mgsm", f"{name}_{Path(args.gguf_file).stem}" if args.gguf_file else name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm_eval.tasks import TaskManager

    device = torch.device(args.device)
    announce_device(device)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    log(f"data: {args.data_dir or 'lm-eval hub dataset'}; indexing lm-eval tasks")
    manager = TaskManager()
    configs = [task_config(manager, t.strip(), args.data_dir, args.max_gen_toks) for t in args.tasks.split(",")]
    docs = load_docs(args.data_dir, max(args.loglik_samples, max(batch_sizes)))
    log(f"loading {args.model}{' / ' + args.gguf_file if args.gguf_file else ''} on {args.device}")
    model, tokenizer = load_model(args)

    result = sweep(model, tokenizer, configs, batch_sizes, args.limit, docs, args.loglik_samples, args.backend,
                   manager, attention_kernels=args.attention_kernels, fused_kernels=args.fused_kernels)

    name = args.out_name or default_out_name(args)
    failures = acceptance_failures(result.rows)
    notes = "\n".join(["Acceptance: " + ("FAILED" if failures else "passed"), *(f"- {f}" for f in failures)])
    extra = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "loglik": result.loglik, "bcg_stats": result.bcg_stats, "acceptance_failures": failures,
             "disagreements": {k: v[:MAX_DISAGREEMENTS] for k, v in result.disagreements.items()}}
    write_results(name, f"MGSM eager vs bcg: {args.model}", result.rows, extra=extra, notes=notes,
                  out_dir=args.out_dir, caveat=speed_caveat(device))
    if args.log_samples:
        path = Path(args.out_dir) / f"{name}_samples.json"
        path.write_text(json.dumps(result.responses, indent=1, ensure_ascii=False) + "\n")
        log(f"wrote {path}")
    for f in failures:
        print(f"ACCEPTANCE FAILED: {f}", flush=True)
    if not failures:
        print("acceptance: scores within 0.01 and agreement >= 0.98 everywhere", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-eval with bcg: the ``bcg`` model type, lm-eval's own command line, and an eager-vs-bcg comparison.

    python -m bcg.eval --model bcg --model_args pretrained=DIR,mode=exact --tasks mgsm_en_local \\
        --include_path tasks --batch_size 32 --output_path out/        # every lm-eval flag works
    python -m bcg.eval compare --model_args pretrained=DIR --tasks mgsm_en_local --include_path tasks \\
        --batch_size 1,32 --modes exact,fast            # one eager run per batch size against each mode;
                                                        # exits 1 when a mode fails its acceptance

``--model bcg`` loads the model as lm-eval's ``hf`` does, wraps it with ``bcg.wrap_model`` (bcg's options come from
``--model_args``), and adds ``handle.stats()`` and throughput per request type to the results JSON under
``config.bcg``. Needs lm-eval (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .buckets import DEFAULT_MAX_NUM_TOKENS
from .wrap import MODES, BcgHandle, speed_choices, unwrap_model, wrap_model

try:
    import lm_eval
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM  # importing lm_eval.models registers lm-eval's own models first
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"bcg.eval needs lm-eval ({error}); install it with pip install -e \".[eval]\"") from error

logger = logging.getLogger("bcg")

MODEL_NAME = "bcg"
# bcg.wrap_model's options, read from --model_args; every other argument goes to lm-eval's HFLM.
WRAP_OPTIONS = ("mode", "max_num_tokens", "capture_sizes", "backend", "lazy", "debug", "static_cache",
                "attention_kernels", "fused_kernels")
ACCEPT_MODES = ("exact", "score")
MIN_AGREEMENT = 0.98
LOGLIK_TOLERANCE = 1e-4
MAX_SCORE_DIFF = 0.02
MAX_DISAGREEMENTS = 20  # per task and batch size, in the output JSON


# ----- the model type -----
@dataclass
class RequestMeter:
    """Wall time and tokens of one lm-eval request type (generate_until, loglikelihood, loglikelihood_rolling)."""

    requests: int = 0
    seconds: float = 0.0
    capture_seconds: float = 0.0  # bcg's one-off graph captures inside ``seconds``
    tokens: int = 0  # generate_until: generated (non-pad) tokens; log-likelihoods: tokens forwarded, padding included

    def as_dict(self, kind: str) -> dict[str, Any]:
        net = self.seconds - self.capture_seconds
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "capture_seconds": round(self.capture_seconds, 4),
            "generated_tokens" if kind == "generate_until" else "forward_tokens": self.tokens,
            "tokens_per_second": round(self.tokens / net, 2) if net > 0 else None,
        }


class BcgLM(HFLM):
    """lm-eval's ``hf`` model wrapped by ``bcg.wrap_model``; registered as ``--model bcg``.

    bcg's options (``mode``, ``max_num_tokens``, ``backend``, ``static_cache``, ``debug``, ``lazy``,
    ``capture_sizes``, ``attention_kernels``, ``fused_kernels``) come from ``--model_args`` beside HFLM's own;
    ``wrap=False`` keeps the model eager (the baseline, with the same throughput figures). ``get_model_info()``
    adds ``bcg``: options, ``handle.stats()`` and per request type the requests, wall seconds, capture seconds,
    tokens and tokens/s (capture time left out).
    """

    def __init__(self, pretrained: Any, *, wrap: bool = True, mode: str = "fast",
                 max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS, capture_sizes: Sequence[int] | None = None,
                 backend: str | None = None, lazy: bool = True, debug: bool | str = False,
                 static_cache: bool | None = None, attention_kernels: str | None = None,
                 fused_kernels: bool | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(wrap, bool):
            raise ValueError(f"wrap must be True or False, got {wrap!r}")
        self.meters: dict[str, RequestMeter] = {}
        self._kind: str | None = None  # the request type being measured
        super().__init__(pretrained, **kwargs)
        self.wrap_options = {"mode": mode, "max_num_tokens": max_num_tokens, "capture_sizes": capture_sizes,
                             "backend": backend, "lazy": lazy, "debug": debug, "static_cache": static_cache,
                             "attention_kernels": attention_kernels, "fused_kernels": fused_kernels}
        self.handle: BcgHandle | None = wrap_model(self.model, **self.wrap_options) if wrap else None
        self._unwrapped = False

    def unwrap(self) -> None:
        """Give the model back unwrapped (graphs freed); ``handle.stats()`` keeps what happened."""
        if self.handle is not None and not self._unwrapped:
            unwrap_model(self.model)
            self._unwrapped = True

    # lm-eval's request methods, timed
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        with self._measure("generate_until", len(requests)):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with self._measure("loglikelihood", len(requests)):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        with self._measure("loglikelihood_rolling", len(requests)):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    # HFLM's model hooks (as lm-eval's own subclasses override them), counting tokens
    def _model_generate(self, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super()._model_generate(context, *args, **kwargs)
        new = out[:, context.shape[1]:]
        pad = self.tokenizer.pad_token_id
        self._count(int((new != pad).sum()) if pad is not None else new.numel())
        return out

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count(inps.numel())
        return super()._model_call(inps, *args, **kwargs)

    def _count(self, tokens: int) -> None:
        if self._kind is not None:  # outside a request method (e.g. batch-size detection) nothing is counted
            self.meters[self._kind].tokens += tokens

    @contextmanager
    def _measure(self, kind: str, requests: int) -> Iterator[None]:
        if self._kind is not None:  # a request method calling another: the outer one counts
            yield
            return
        meter = self.meters.setdefault(kind, RequestMeter())
        capture_before = self._capture_seconds()
        self._kind = kind
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            meter.seconds += time.perf_counter() - start
            meter.requests += requests
            meter.capture_seconds += self._capture_seconds() - capture_before
            self._kind = None

    def _capture_seconds(self) -> float:
        return self.handle.stats()["capture_seconds"] if self.handle is not None else 0.0

    def bcg_info(self) -> dict[str, Any]:
        """What lands in the results under ``config.bcg``."""
        return {
            "wrapped": self.handle is not None,
            "options": self.wrap_options if self.handle is not None else None,
            "stats": self.handle.stats() if self.handle is not None else None,
            "requests": {kind: meter.as_dict(kind) for kind, meter in self.meters.items()},
        }

    def get_model_info(self) -> dict:
        """HFLM's model info plus ``bcg`` (lm-eval merges it into ``results["config"]``, written to the JSON)."""
        info = {**super().get_model_info(), "bcg": self.bcg_info()}
        for kind, figures in info["bcg"]["requests"].items():
            logger.info("bcg: %s: %d requests in %.2f s, %s tokens/s", kind, figures["requests"], figures["seconds"],
                        figures["tokens_per_second"])
        if (stats := info["bcg"]["stats"]) is not None:
            logger.info("bcg: replays=%d rejects=%s captured=%s capture_seconds=%.2f", stats["replays"],
                        stats["rejects"] or 0, stats["captured"], stats["capture_seconds"])
        return info


# A lazy target: registering the same string twice is a no-op, so `python -m bcg.eval` (this file run as __main__,
# then imported as bcg.eval when lm-eval resolves the name) registers one class, bcg.eval.BcgLM.
if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target="bcg.eval:BcgLM")


# ----- eager vs bcg -----
@dataclass
class Comparison:
    """Eager and bcg runs of the same tasks, per batch size and bcg mode: accuracy rows, speed rows, what differed."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # one per task, batch size and mode
    speed: list[dict[str, Any]] = field(default_factory=list)  # one per request type, batch size and mode
    bcg_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # "bs<N>/<mode>" -> handle.stats()
    # "<task>/bs<N>/<mode>" -> the documents whose responses differ; -> side ("eager", "bcg") -> doc -> responses
    disagreements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    responses: dict[str, dict[str, dict[int, Any]]] = field(default_factory=dict)


def split_model_args(model_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HFLM's arguments, bcg's wrap options) from one ``--model_args`` dict."""
    hf = {k: v for k, v in model_args.items() if k not in WRAP_OPTIONS and k != "wrap"}
    return hf, {k: v for k, v in model_args.items() if k in WRAP_OPTIONS}


def compare_modes(model_args: dict[str, Any], modes: Sequence[str] | None) -> list[str]:
    """The bcg modes to run: ``modes``, else ``model_args``' mode, else bcg's default; named once, known, no repeats."""
    if modes is not None and "mode" in model_args:
        raise ValueError(f"mode={model_args['mode']} in model_args and modes {list(modes)}: name the modes once")
    chosen = list(modes) if modes is not None else [model_args.get("mode", "fast")]
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(MODES):
        raise ValueError(f"modes must be distinct values of {MODES}, got {chosen}")
    return chosen


def compare(model_args: dict[str, Any], tasks: Sequence[str], *, batch_sizes: Sequence[int] = (1,),
            modes: Sequence[str] | None = None, device: str | None = None, task_manager: TaskManager | None = None,
            include_path: str | Path | None = None, metadata: dict[str, Any] | None = None,
            **evaluate_options: Any) -> Comparison:
    """Run ``tasks`` through ``lm_eval.simple_evaluate`` eagerly, then wrapped by bcg in each of ``modes``, at each
    batch size.

    One model is loaded (``model_args`` as for ``--model bcg``); per batch size the eager run goes first, then per
    mode the same model object wrapped and unwrapped again, each compared with that one eager run. ``modes``: default
    ``model_args``' mode (bcg's default when absent). Tasks come from ``task_manager``, else from a ``TaskManager`` of
    lm-eval's tasks plus ``include_path``, with ``metadata`` (e.g. ``{"data_dir": DIR}``). ``evaluate_options`` go to
    ``simple_evaluate`` (``limit``, ``num_fewshot``, ``gen_kwargs``, ``apply_chat_template``, ...); its caches stay off.
    """
    from lm_eval import simple_evaluate

    modes = compare_modes(model_args, modes)
    hf_args, wrap_options = split_model_args(model_args)
    wrap_options.pop("mode", None)
    if "pretrained" not in hf_args:
        raise ValueError("model_args needs pretrained=<model id or directory>")
    device = device or hf_args.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = task_manager or TaskManager(include_path=str(include_path) if include_path else None, metadata=metadata)
    loader = BcgLM(wrap=False, device=device, **{k: v for k, v in hf_args.items() if k != "batch_size"})
    model, tokenizer = loader.model, loader.tokenizer
    # generate() must not compile either run (a static-cache generation config would): eager would not be eager.
    model.generation_config.disable_compile = True
    # Every run gets the loaded model object; HFLM's other options (max_length, add_bos_token, ...) apply to each.
    shared = {k: v for k, v in hf_args.items() if k not in ("pretrained", "tokenizer", "batch_size", "device")}

    def run(lm: BcgLM) -> dict[str, Any]:
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True,
                               bootstrap_iters=0, **evaluate_options)

    comparison = Comparison()
    for bs in batch_sizes:
        logger.info("bcg.eval compare: eager run, batch size %d", bs)
        eager = run(BcgLM(model, tokenizer=tokenizer, batch_size=bs, wrap=False, **shared))
        for mode in modes:
            logger.info("bcg.eval compare: bcg run, batch size %d, mode %s, %s", bs, mode, wrap_options)
            lm = BcgLM(model, tokenizer=tokenizer, batch_size=bs, mode=mode, **shared, **wrap_options)
            try:
                wrapped = run(lm)
            finally:
                lm.unwrap()
            add_runs(comparison, eager, wrapped, bs, mode)
    return comparison


def add_runs(comparison: Comparison, eager: dict[str, Any], wrapped: dict[str, Any], batch_size: int,
             mode: str) -> None:
    """Compare two ``simple_evaluate(..., log_samples=True)`` results of the same tasks, sample by sample."""
    for task, eager_samples in eager["samples"].items():
        key = f"{task}/bs{batch_size}/{mode}"
        ours, theirs = _responses(eager_samples), _responses(wrapped["samples"][task])
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"{task}: the two runs evaluated different documents")
        differing, diffs = [], []
        for doc_id in sorted(ours):
            same, diff = _same_response(ours[doc_id], theirs[doc_id])
            diffs += diff
            if not same:
                differing.append({"doc_id": doc_id, "eager": ours[doc_id], "bcg": theirs[doc_id]})
        n = len(ours)
        comparison.rows.append({
            "task": task, "batch_size": batch_size, "mode": mode, "n": n,
            "scores": {metric: [value, wrapped["results"][task].get(metric)]
                       for metric, value in eager["results"][task].items() if _is_score(metric, value)},
            "agreement": (n - len(differing)) / n if n else 1.0,
            "loglik_max_abs_diff": max(diffs) if diffs else None,
        })
        comparison.disagreements[key] = differing
        comparison.responses[key] = {"eager": ours, "bcg": theirs}
    # Throughput and stats come from BcgLM's model info (config.bcg); other LM types have none.
    eager_speed = eager["config"].get("bcg", {}).get("requests", {})
    bcg_info = wrapped["config"].get("bcg", {})
    for kind, figures in bcg_info.get("requests", {}).items():
        base = eager_speed.get(kind, {})
        comparison.speed.append({
            "request_type": kind, "batch_size": batch_size, "mode": mode, "requests": figures["requests"],
            "eager_s": base.get("seconds"), "bcg_s": figures["seconds"], "bcg_capture_s": figures["capture_seconds"],
            "eager_tok_s": base.get("tokens_per_second"), "bcg_tok_s": figures["tokens_per_second"],
        })
    comparison.bcg_stats[f"bs{batch_size}/{mode}"] = bcg_info.get("stats")


def _responses(samples: list[dict[str, Any]]) -> dict[int, list[Any]]:
    """doc_id -> its requests' raw outputs: texts, (log-likelihood, is_greedy) pairs or rolling log-likelihoods."""
    out: dict[int, list[Any]] = {}
    for sample in samples:  # each document is logged once per filter, with the same raw outputs
        out.setdefault(sample["doc_id"], [resps[0] for resps in sample["resps"]])
    return out


def _same_response(eager: list[Any], wrapped: list[Any]) -> tuple[bool, list[float]]:
    """Whether a document's response is the same (its text; for log-likelihoods the choice made and greedy flags),
    and the absolute log-likelihood differences."""
    if all(isinstance(r, str) for r in eager + wrapped):
        return eager == wrapped, []
    lls = [[r[0] if isinstance(r, (tuple, list)) else r for r in side] for side in (eager, wrapped)]
    greedy = [[r[1] for r in side if isinstance(r, (tuple, list))] for side in (eager, wrapped)]
    choice = [max(range(len(side)), key=side.__getitem__) for side in lls]
    return choice[0] == choice[1] and greedy[0] == greedy[1], [abs(a - b) for a, b in zip(*lls, strict=True)]


def _is_score(metric: str, value: Any) -> bool:
    return "," in metric and "_stderr" not in metric and isinstance(value, (int, float))


def default_acceptance(model_args: dict[str, Any]) -> str:
    """The acceptance ``model_args``' choices should pass: ``exact`` when they leave every kernel eager's (mode=exact
    without overrides, or both overrides off) and decode on the caller's own cache, else ``score`` (static stand-ins:
    attention over their rounded positions rounds differently)."""
    choices = speed_choices(model_args.get("mode", "fast"), model_args.get("attention_kernels"),
                            model_args.get("fused_kernels"), device=None, static_cache=model_args.get("static_cache"))
    return "score" if choices.fast_decode or choices.static_cache else "exact"


def acceptances(model_args: dict[str, Any], modes: Sequence[str], accept: str | None = None) -> dict[str, str]:
    """Per mode the acceptance it must pass: ``accept`` for all, else each mode's own (``default_acceptance``)."""
    return {mode: accept or default_acceptance({**model_args, "mode": mode}) for mode in modes}


def acceptance_failures(comparison: Comparison, accept: str | Mapping[str, str], *,
                        min_agreement: float = MIN_AGREEMENT, loglik_tolerance: float = LOGLIK_TOLERANCE,
                        max_score_diff: float = MAX_SCORE_DIFF) -> list[str]:
    """``exact``: >= ``min_agreement`` identical responses and log-likelihoods within ``loglik_tolerance``;
    ``score``: every score within ``max_score_diff``. ``accept``: one for every row, or one per mode. An empty list:
    accepted."""
    failures = []
    for row in comparison.rows:
        rule = accept if isinstance(accept, str) else accept[row["mode"]]
        if rule not in ACCEPT_MODES:
            raise ValueError(f"accept must be one of {ACCEPT_MODES}, got {rule!r}")
        where = f"{row['task']} bs={row['batch_size']} {row['mode']} ({rule})"
        if rule == "exact":
            if row["agreement"] < min_agreement:
                failures.append(f"{where}: {row['agreement']:.1%} identical responses < {min_agreement:.0%}")
            if row["loglik_max_abs_diff"] is not None and row["loglik_max_abs_diff"] > loglik_tolerance:
                failures.append(f"{where}: log-likelihoods differ by up to {row['loglik_max_abs_diff']:.3g} "
                                f"> {loglik_tolerance:g}")
        else:
            for metric, (eager, wrapped) in row["scores"].items():
                if wrapped is None or abs(eager - wrapped) > max_score_diff:
                    failures.append(f"{where}: {metric} eager {eager} vs bcg {wrapped} differs by more than "
                                    f"{max_score_diff}")
    return failures


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of flat rows (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def accuracy_table(comparison: Comparison) -> list[dict[str, Any]]:
    """Flat rows, the same columns for every task: scores as ``eager / bcg``, identical responses, the largest
    log-likelihood difference."""

    def scores(row: dict[str, Any]) -> str:
        return "; ".join(f"{metric} {e:.4g} / {'-' if b is None else f'{b:.4g}'}"
                         for metric, (e, b) in row["scores"].items())

    return [{"task": r["task"], "batch_size": r["batch_size"], "mode": r["mode"], "n": r["n"],
             "scores (eager / bcg)": scores(r),
             "identical": r["agreement"], "loglik_max_abs_diff": r["loglik_max_abs_diff"]} for r in comparison.rows]


# ----- command line -----
def _dict_arg(text: str) -> dict[str, Any]:
    """``key=value,...`` as lm-eval parses it, or a JSON object (for lists: ``{"capture_sizes": [1, 8]}``)."""
    return json.loads(text) if text.lstrip().startswith("{") else simple_parse_args_string(text)


def _modes_arg(text: str) -> list[str]:
    return [mode for mode in text.split(",") if mode]


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bcg.eval compare",
        description="Eager vs bcg on the same lm-eval tasks (lm_eval.simple_evaluate, log_samples): scores side by "
                    "side, identical responses, log-likelihood differences, tokens/s per request type. Exits 1 when "
                    "the acceptance fails.")
    p.add_argument("--model_args", type=_dict_arg, required=True,
                   help="as for --model bcg: pretrained=DIR,gguf_file=F,dtype=bfloat16,mode=exact,... "
                        "(or a JSON object)")
    p.add_argument("--modes", type=_modes_arg,
                   help=f"comma-separated bcg modes ({', '.join(MODES)}), each compared with one eager run per batch "
                        "size (default: model_args' mode, else fast)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include_path", help="extra task folder, e.g. tasks (mgsm_en_local: local MGSM data)")
    p.add_argument("--batch_size", default="1", help="comma-separated batch sizes, each run eager then bcg "
                                                     "(default %(default)s)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", type=int)
    p.add_argument("--gen_kwargs", type=_dict_arg, help="e.g. max_gen_toks=64")
    p.add_argument("--apply_chat_template", nargs="?", const=True, default=False)
    p.add_argument("--fewshot_as_multiturn", action="store_true", help="on with --apply_chat_template")
    p.add_argument("--system_instruction")
    p.add_argument("--metadata", type=_dict_arg, help="task metadata, e.g. data_dir=DIR for the local MGSM tasks")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--accept", choices=ACCEPT_MODES,
                   help=f"exact: >= {MIN_AGREEMENT:.0%} identical responses and equal log-likelihoods; score: "
                        f"every score within {MAX_SCORE_DIFF} (default: each mode's own, exact for mode=exact, score "
                        "for mode=fast)")
    p.add_argument("--min_agreement", type=float, default=MIN_AGREEMENT)
    p.add_argument("--loglik_tolerance", type=float, default=LOGLIK_TOLERANCE,
                   help="largest absolute log-likelihood difference accepted as equal (default %(default)s)")
    p.add_argument("--max_score_diff", type=float, default=MAX_SCORE_DIFF)
    p.add_argument("--output_path", type=Path, help="a .json file, or a folder for bcg_compare.json")
    p.add_argument("--log_samples", action="store_true", help="also write every eager and bcg response")
    return p


def run_compare(argv: Sequence[str]) -> int:
    """``python -m bcg.eval compare ...``: 0 when accepted, 1 when not."""
    args = compare_parser().parse_args(argv)
    modes = compare_modes(args.model_args, args.modes)
    accept = acceptances(args.model_args, modes, args.accept)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {k: v for k, v in {"limit": args.limit, "num_fewshot": args.num_fewshot, "gen_kwargs": args.gen_kwargs,
                                 "system_instruction": args.system_instruction}.items() if v is not None}
    comparison = compare(args.model_args, [t for t in args.tasks.split(",") if t],
                         batch_sizes=[int(b) for b in args.batch_size.split(",")], modes=args.modes, device=device,
                         include_path=args.include_path, metadata=args.metadata,
                         apply_chat_template=args.apply_chat_template,
                         fewshot_as_multiturn=args.fewshot_as_multiturn or bool(args.apply_chat_template), **options)
    failures = acceptance_failures(comparison, accept, min_agreement=args.min_agreement,
                                   loglik_tolerance=args.loglik_tolerance, max_score_diff=args.max_score_diff)
    print(markdown(accuracy_table(comparison)))
    print(markdown(comparison.speed))
    if not device.startswith("cuda"):
        print(f"NOT speed figures: on {device} bcg runs its eager backend (no CUDA graphs); this checks the code path.")
    if args.output_path is not None:
        write_comparison(comparison, args, accept, failures)
    print(verdict(accept, failures))
    return 1 if failures else 0


def verdict(accept: Mapping[str, str], failures: list[str]) -> str:
    """What passed or failed, per mode, as printed at the end of a comparison."""
    rules = ", ".join(f"{mode}: {rule}" for mode, rule in accept.items())
    return "\n".join(f"ACCEPTANCE FAILED: {f}" for f in failures) if failures else f"acceptance passed ({rules})"


def write_comparison(comparison: Comparison, args: argparse.Namespace, accept: Mapping[str, str],
                     failures: list[str]) -> Path:
    path = args.output_path if args.output_path.suffix == ".json" else args.output_path / "bcg_compare.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(sys.argv), "lm_eval": lm_eval.__version__, "model_args": args.model_args,
        "tasks": args.tasks, "accept": accept, "acceptance_failures": failures,
        "rows": comparison.rows, "speed": comparison.speed, "bcg_stats": comparison.bcg_stats,
        "disagreements": {k: v[:MAX_DISAGREEMENTS] for k, v in comparison.disagreements.items()},
        **({"responses": comparison.responses} if args.log_samples else {}),
    }
    path.write_text(json.dumps(payload, indent=1, default=str, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    return path


HELP = """python -m bcg.eval: lm-eval's command line with bcg's model type registered as --model bcg (the default here).
  --model_args pretrained=...,<any hf option>,<bcg options>: mode=fast|exact, max_num_tokens=N,
      backend=cuda|eager, debug=True|numerics, lazy=False, capture_sizes=[1,8,32], attention_kernels=fast|eager,
      fused_kernels=True|False, static_cache=True|False (the last three override mode's choice),
      wrap=False (stay eager: the baseline, with the same throughput figures)
  bcg's stats and tokens/s per request type land in the results JSON under config.bcg.
python -m bcg.eval compare ...: eager vs bcg on the same tasks (python -m bcg.eval compare --help).
Offline MGSM: --include_path tasks --tasks mgsm_en_local (or one of its tasks; --metadata data_dir=DIR).
lm-eval's own help follows.
"""


def _with_default_model(argv: list[str]) -> list[str]:
    """lm-eval's run arguments, with ``--model bcg`` unless a model or a config file is named."""
    named = any(a in ("--model", "-M", "--config", "-C") or a.startswith(("--model=", "--config=")) for a in argv)
    return argv if named else [*argv, "--model", MODEL_NAME]


def main(argv: Sequence[str] | None = None) -> int:
    """``compare`` runs the comparison; anything else goes to lm-eval's own CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return run_compare(argv[1:])
    from lm_eval.__main__ import cli_evaluate  # the console script `lm-eval` itself

    if not argv or argv in (["-h"], ["--help"]):
        print(HELP)
        argv = ["run", "--help"]
    elif argv[0] not in ("ls", "validate"):
        argv = _with_default_model(argv)
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    # bcg's progress and figures (lm-eval sets up its own logger and keeps it to itself).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    sys.exit(main())

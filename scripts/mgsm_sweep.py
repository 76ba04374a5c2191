"""MGSM accuracy sweep, eager vs bcg: a thin front of ``python -m bcg.eval compare`` writing ``results/mgsm/`` files.

One model, each batch size run eagerly and then wrapped by bcg, through ``lm_eval.simple_evaluate`` on the local
MGSM tasks in ``tasks/`` (generation: ``mgsm_direct_en_local``; log-likelihoods: ``mgsm_choice_en_local``, lm-eval's
right-padded, mask-free batches). With ``--mode exact,fast`` each eager run is compared with both modes. Exits 1
when a mode fails its acceptance (``--accept exact``: >= 98% identical responses and equal log-likelihoods;
``score``: scores within 0.02; default: the one each mode promises, exact for ``exact``, score for ``fast``).

    python scripts/mgsm_sweep.py --model DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --max-gen-toks 64 \\
        --mode exact,fast                               # all 250 questions, batch 1 and 32, both modes
    python scripts/mgsm_sweep.py --model DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --max-gen-toks 64
                                                        # the default mode "fast": bf16 text may fork, acceptance score

The same comparison without this script: ``python -m bcg.eval compare --model_args pretrained=DIR,... --tasks
mgsm_en_local --include_path tasks --batch_size 1,32 --modes exact,fast``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from benchutil import add_out_dir, announce_device, results_name, speed_caveat
from report import print_written, write_results

from bcg.eval import (ACCEPT_MODES, MAX_DISAGREEMENTS, acceptances, accuracy_table, acceptance_failures, compare,
                      compare_modes, markdown, verdict)

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
DEFAULT_TASKS = "mgsm_direct_en_local,mgsm_choice_en_local"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model id or local path")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (needs the gguf package)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval tasks (default %(default)s; "
                   "mgsm_native_cot_en_local too, or hub tasks such as mgsm_direct_en when online)")
    p.add_argument("--limit", type=int, help="questions per task (default: all 250)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default %(default)s)")
    p.add_argument("--data-dir", type=Path, help="MGSM JSONL folder (default: the copy shipped in "
                   "tasks/mgsm_en_local/data/)")
    p.add_argument("--dtype", help="torch dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-gen-toks", type=int, help="override the task's generation length (lm-eval default 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, here %(default)s")
    p.add_argument("--backend", choices=["cuda", "eager"], help="bcg backend (default: bcg picks by device)")
    p.add_argument("--mode", default="fast",
                   help="bcg's modes, comma-separated: 'fast' (bcg's default: faster decode kernels, bf16 text may "
                        "fork) and/or 'exact' (eager's kernels: the same answers) (default %(default)s)")
    p.add_argument("--static-cache", choices=("true", "false"),
                   help="wrap with static_cache=True / False (decode steps as one graph on bcg's static stand-ins, or "
                        "through the breaks); default: from the mode (fast: true, exact: false)")
    p.add_argument("--accept", choices=ACCEPT_MODES, help="default: each mode's own, exact for exact, score for fast")
    p.add_argument("--out-name", help="results file stem (default mgsm_<model basename>)")
    add_out_dir(p, "mgsm")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every eager and bcg response to <out-name>_samples.json")
    return p.parse_args(argv)


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model_args`` of ``--model bcg``: HFLM's loading options and bcg's wrap options."""
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    wrap = {"backend": args.backend} if args.backend else {}
    if args.static_cache is not None:
        wrap["static_cache"] = args.static_cache == "true"
    return {"pretrained": args.model, "dtype": dtype, **extra, **wrap}


def modes(args: argparse.Namespace) -> list[str]:
    return compare_modes({}, [m for m in args.mode.split(",") if m])


def default_out_name(args: argparse.Namespace) -> str:
    """``mgsm_<model basename>``, plus the GGUF file's stem: one directory may hold several quantisations."""
    name = Path(args.model.rstrip("/")).name
    return results_name("mgsm", f"{name}_{Path(args.gguf_file).stem}" if args.gguf_file else name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accept = acceptances(model_args(args), modes(args), args.accept)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    device = torch.device(args.device)
    announce_device(device)
    comparison = compare(
        model_args(args), args.tasks.split(","), batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        modes=modes(args), device=args.device, include_path=TASKS_DIR, limit=args.limit,
        metadata={"data_dir": str(args.data_dir)} if args.data_dir else None,
        gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None)
    failures = acceptance_failures(comparison, accept)
    name = args.out_name or default_out_name(args)
    notes = "\n".join([markdown(comparison.speed), verdict(accept, failures)])
    extra = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "accept": accept,
             "rows_detail": comparison.rows, "speed": comparison.speed, "bcg_stats": comparison.bcg_stats,
             "acceptance_failures": failures,
             "disagreements": {k: v[:MAX_DISAGREEMENTS] for k, v in comparison.disagreements.items()}}
    written = write_results(name, f"MGSM eager vs bcg: {args.model}", accuracy_table(comparison), extra=extra,
                            notes=notes, out_dir=args.out_dir, caveat=speed_caveat(device))
    print(markdown(comparison.speed))
    if args.log_samples:
        samples = Path(args.out_dir) / f"{name}_samples.json"
        samples.write_text(json.dumps(comparison.responses, indent=1, ensure_ascii=False) + "\n")
        written = (*written, samples)
    print(verdict(accept, failures), flush=True)
    print_written(written)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

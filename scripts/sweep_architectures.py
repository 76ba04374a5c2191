"""Every causal-LM type the installed transformers ships, tiny and random, eager beside bcg: its eager backend on the
CPU, its CUDA graphs on a GPU (``--device cuda``: the captures and replays themselves, which the CPU cannot check).

Finds what a new transformers release breaks: for each model type a 2-layer fp32 model is built from its own config
(small sizes, a sliding window of 6 where the config has one, so windows bite), and a left-padded batch runs eagerly
and wrapped: logits on real tokens and greedy ``generate()`` tokens. Each type ends as one of

    replays        every call replayed, outputs equal eager's
    fallback       bcg stayed eager with a warning (the reason is listed), outputs equal eager's
    MISMATCH       wrapped outputs differ from eager's: silently wrong unless a warning says otherwise
    CRASH          a wrapped call raised where eager did not
    eager fails / not built   the tiny config does not run in transformers itself

and the script exits 1 when any type is MISMATCH or CRASH. Each type runs in a forked child with a time limit.

    python scripts/sweep_architectures.py                          # all types (~15 min on 2 cores)
    python scripts/sweep_architectures.py --types moshi ctrl zamba2 --out-dir /tmp/sweep
    python scripts/sweep_architectures.py --wrap '{"static_cache": true}' --out-name sweep_architectures_static_cache
    python scripts/sweep_architectures.py --device cuda --jobs 8 --out-name sweep_architectures_gpu

Writes ``results/sweep_architectures/<out-name>.{json,md}`` (``--out-dir``) and ends by naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchutil import add_out_dir
from report import print_written, write_results
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import bcg
from bcg import hf

TOLERANCE = 1e-4
# Set when the type's default config has the field (the first group always): small, and windows that bite.
ALWAYS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IF_PRESENT = dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_local_experts=4, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_group=1,
                  topk_group=1, sliding_window=6)
# Types whose config needs other small sizes to build and run eagerly: (extra fields, fields to leave at default).
_ENCODER_DECODER = dict(decoder_layers=2, encoder_layers=2, d_model=64, decoder_attention_heads=4,
                        encoder_attention_heads=4, decoder_ffn_dim=128, encoder_ffn_dim=128)
_LATENT = ({}, ("head_dim", "n_group", "topk_group", "num_key_value_heads"))  # multi-head latent attention sizes
# indexed (DSA) attention: a small indexer keeping 16 past tokens, every one of the sweep's 14 positions. Decode steps
# run on bcg's static stand-in, which computes what transformers' static indexed layers compute: among exactly tied
# index scores (random weights tie at the indexer's ReLU zero) those select other keys than the dynamic cache's, so a
# biting selection would differ from eager's by design. tests/test_sparse_attention.py makes it bite (4 tokens).
_INDEXED = (dict(index_topk=16, index_n_heads=4, index_head_dim=64), ("head_dim", "num_key_value_heads"))
_LINEAR_AND_FULL = ["linear_attention", "full_attention"] * 2
OVERRIDES: dict[str, tuple[dict, tuple]] = {
    **{t: (_ENCODER_DECODER, ()) for t in ("bart", "mbart", "blenderbot", "blenderbot-small", "marian", "mvp",
                                            "pegasus", "bigbird_pegasus", "plbart", "whisper")},
    **{t: _LATENT for t in ("deepseek_v3", "glm4_moe_lite", "minicpm3", "sarvam_mla", "youtu")},
    # two attention sublayers per decoder layer; 5.17 keeps num_layers apart from num_hidden_layers (twice it)
    "longcat_flash": (dict(num_layers=1), _LATENT[1]),
    # latent attention with MoE from the first layer: the experts in one group (the default 8 groups of 4 experts hold
    # none), and the experts per token DeepSeek-V2's config leaves unset
    "axk1": ({}, ("head_dim", "num_key_value_heads")),
    "deepseek_v2": (dict(num_experts_per_tok=2), _LATENT[1]),
    **{t: _INDEXED for t in ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4")},
    "codegen": (dict(rotary_dim=8), ()),
    "gptj": (dict(rotary_dim=8), ()),
    "dory": ({}, ("sliding_window",)),
    # hybrids whose default layouts put the first attention layer past a tiny model's end
    "bamba": (dict(num_hidden_layers=4, attn_layer_indices=[1]), ()),
    "jamba": (dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1), ()),
    "granitemoehybrid": (dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"]), ()),
    "dots1": (dict(max_window_layers=2), ()),
    "kimi_linear": (dict(num_hidden_layers=4, layer_types=_LINEAR_AND_FULL), ("head_dim", "num_key_value_heads")),
    "bailing_hybrid": (dict(num_hidden_layers=4, layer_types=_LINEAR_AND_FULL), ("head_dim", "num_key_value_heads")),
    "lfm2_moe": (dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], num_dense_layers=1),
                 ()),
    **{t: (dict(unpadded_vocab_size=128), ()) for t in ("inkling2", "inkling2_text", "inkling2_loop",
                                                         "inkling2_loop_text")},
}


def small_config(model_type: str) -> Any:
    """The type's (text) config with small sizes; a field the config rejects is dropped and the build retried."""
    default = AutoConfig.for_model(model_type)
    text = default.get_text_config(decoder=True)
    target = text.model_type if text is not default else model_type
    extra, keep_default = OVERRIDES.get(model_type, ({}, ()))
    kwargs = {**ALWAYS, **{k: v for k, v in IF_PRESENT.items() if getattr(text, k, None) is not None}, **extra}
    for name in keep_default:
        kwargs.pop(name, None)
    for _ in range(len(kwargs)):
        try:
            config = AutoConfig.for_model(target, **kwargs)
        except Exception as error:  # drop the field the message names, if it names one
            named = [k for k in kwargs if k in str(error)]
            if not named:
                raise
            kwargs.pop(named[0])
            continue
        if hf.attention_layers(config, config.num_hidden_layers) == 0 and kwargs["num_hidden_layers"] < 4:
            kwargs["num_hidden_layers"] = 4  # a hybrid's first layers are mixers: reach an attention layer
            continue
        return config
    raise RuntimeError("no config builds with small sizes")


def left_padded_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ALWAYS["vocab_size"], (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((3, 0, 5)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def run_type(model_type: str, wrap: dict[str, Any] | None = None, device: str = "cpu",
             generate: dict[str, Any] | None = None) -> dict[str, Any]:
    """One type's outcome (see the module docstring), with bcg's stats and warnings; ``wrap``: more wrap options;
    ``device``: "cpu" (bcg's eager backend) or "cuda" (its CUDA graphs); ``generate``: more generate() options."""
    try:
        config = small_config(model_type)
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config).eval().to(device)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval().to(device)
    except Exception as error:
        return {"outcome": "not built", "detail": _short(error)}
    ids, mask = left_padded_batch(device)
    # disable_compile: generate() would compile the reference's decode for a static cache; eager is the reference
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, disable_compile=True, **(generate or {}))
    try:
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits
        expected_tokens = reference.generate(ids, attention_mask=mask, **generate)
    except Exception as error:
        return {"outcome": "eager fails", "detail": _short(error)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            handle = bcg.wrap_model(model, backend="eager" if device == "cpu" else "cuda", **(wrap or {}))
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(ids, attention_mask=mask, **generate)
        except Exception as error:
            return {"outcome": "CRASH", "detail": _short(error), "where": traceback.format_exc(limit=-3)}
    said = sorted({str(w.message)[:160] for w in caught if issubclass(w.category, bcg.BcgWarning)})
    real = mask.bool()
    diff = (logits[real] - expected[real]).abs().max().item()
    equal = diff <= TOLERANCE and torch.equal(tokens, expected_tokens)
    stats = handle.stats()
    outcome = "MISMATCH" if not equal else "replays" if stats["ready"] and stats["replays"] else "fallback"
    return {"outcome": outcome, "detail": "; ".join(said), "max_abs_diff": diff, "replays": stats["replays"],
            "full_graph_replays": stats["full_graph_replays"], "rejects": stats["rejects"]}


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def run_isolated(types: list[str], timeout: int, wrap: dict[str, Any] | None = None, device: str = "cpu",
                 jobs: int = 1, generate: dict[str, Any] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each type's ``run_type`` in a forked child, up to ``jobs`` at once, as each ends: a hang or a hard crash costs
    one row, not the sweep. The parent never touches CUDA (a forked child could not use it then)."""
    pending, running = list(types), {}
    with tempfile.TemporaryDirectory() as directory:
        while pending or running:
            while pending and len(running) < jobs:
                model_type = pending.pop(0)
                path = Path(directory) / f"{model_type}.json"
                run = partial(run_type, model_type, wrap, device, generate)
                running[_start_child(path, timeout, run)] = model_type, path
            pid, status = os.wait()
            model_type, path = running.pop(pid)
            text = path.read_text() if path.exists() else ""
            yield model_type, (json.loads(text) if text else
                               {"outcome": "not built", "detail": f"child ended (status {status}, limit {timeout} s)"})


def _start_child(path: Path, timeout: int, run: Callable[[], dict[str, Any]]) -> int:
    """Fork a child that writes ``run()``'s result to ``path``; its pid."""
    pid = os.fork()
    if pid:
        return pid
    signal.alarm(timeout)
    try:
        result = run()
    except BaseException as error:  # noqa: BLE001 - anything is a row
        result = {"outcome": "CRASH", "detail": _short(error)}
    path.write_text(json.dumps(result, default=str))
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", help="model types (default: every causal-LM type of this transformers)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per type (default %(default)s)")
    add_out_dir(parser, "sweep_architectures")
    parser.add_argument("--out-name", default="sweep_architectures")
    parser.add_argument("--wrap", type=json.loads, default={},
                        help='more bcg.wrap_model options as JSON, e.g. \'{"static_cache": true}\'')
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: bcg's eager backend; cuda: its CUDA graphs (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="types run at once (default %(default)s)")
    parser.add_argument("--generate", type=json.loads, default={},
                        help='more generate() options as JSON, e.g. \'{"cache_implementation": "static"}\'')
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    torch.set_num_threads(1)
    rows = []
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for model_type, result in run_isolated(types, args.timeout, args.wrap, args.device, args.jobs, args.generate):
        row = {"model_type": model_type, **result}
        print(f"{model_type:32s} {row['outcome']:12s} {row.get('detail', '')[:100]}", flush=True)
        rows.append(row)
    rows.sort(key=lambda r: types.index(r["model_type"]))
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in dict.fromkeys(r["outcome"]
                                                                                               for r in rows)}
    bad = [r["model_type"] for r in rows if r["outcome"] in ("MISMATCH", "CRASH")]
    notes = f"Outcomes: {counts}. MISMATCH or CRASH: {bad or 'none'}."
    how = "eager backend" if args.device == "cpu" else "CUDA graphs"
    written = write_results(args.out_name, f"Causal-LM types, eager vs bcg ({how}, fp32, tiny random models)", rows,
                            extra={"counts": counts}, notes=notes, out_dir=args.out_dir,
                            caveat=f"{args.device.upper()} correctness sweep ({how}): NOT speed figures")
    print(notes)
    print_written(written)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

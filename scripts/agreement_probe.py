"""Where does bf16 greedy divergence between eager and bcg come from? Pairwise agreement of variants.

    python scripts/agreement_probe.py --model DIR --gguf-file FILE.gguf > results/agreement_probe/NAME.txt

Variants, all greedy on the same MGSM prompts: eager as loaded; eager with SDPA restricted to flash /
memory-efficient / math (what bcg's breaks use); eager one prompt at a time (batch composition); bcg; and
bcg with ``attention_kernels="eager"`` (SDPA left unrestricted). Prints how many generations are identical for each
pair.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer

import bcg

MGSM_TEST = Path(__file__).resolve().parents[1] / "tasks" / "mgsm_en_local" / "data" / "mgsm_en_test.jsonl"
RESTRICTED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--data", default=str(MGSM_TEST), help="MGSM JSONL questions (default: the copy shipped with "
                        "the lm-eval tasks, tasks/mgsm_en_local/data/)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file, dtype=torch.bfloat16).cuda()
    questions = [json.loads(line)["question"] for line in Path(args.data).read_text().splitlines()[: args.prompts]]
    prompts = [f"Question: {q}\nAnswer: Let's think step by step." for q in questions]
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def generate(batch_prompts: list[str], context=nullcontext) -> list[str]:
        batch = tokenizer(batch_prompts, return_tensors="pt", padding=True).to("cuda")
        with context():
            out = model.generate(**batch, **kwargs)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    runs = {
        "eager": generate(prompts),
        "eager_restricted": generate(prompts, lambda: sdpa_kernel(RESTRICTED)),
        "eager_one_by_one": [generate([p])[0] for p in prompts],
    }
    handle = bcg.wrap_model(model)
    runs["bcg"] = generate(prompts)
    bcg.unwrap_model(model)
    handle = bcg.wrap_model(model, attention_kernels="eager")
    runs["bcg_unrestricted"] = generate(prompts)
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = sum(x == y for x, y in zip(runs[a], runs[b]))
            print(f"{a:>18} vs {b:<18} {same}/{len(prompts)} identical")
    print("bcg stats:", {k: handle.stats()[k] for k in ("replays", "rejects")})


if __name__ == "__main__":
    main()

"""Continuing a returned cache with several new tokens: a second chat turn, k-token forward calls on a past, prompt
lookup decoding. transformers 5.25 made this path wrong for every Gated DeltaNet hybrid without a word (decode steps
advanced a counter the graphs did not own): it is checked here for every hybrid family and a plain model, on CPU (eager
backend; tests/test_gpu.py runs the same on real graphs)."""

import pytest
import torch

import bcg
from bcg import hf
from tiny_models import HYBRID_ARCHITECTURES, left_padded_batch, tiny_model

FAMILIES = sorted(HYBRID_ARCHITECTURES) + ["llama"]
GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def _cache_name(model) -> str:
    return hf.cache_argument(model.forward)


def two_turns(model, ids, mask):
    """generate(), then a second turn of three new tokens per sequence on the returned cache (a chat's next message),
    generated on; both turns' sequences."""
    first = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **GENERATE)
    cache = first[_cache_name(model)] if _cache_name(model) in first else first.past_key_values
    turn = torch.cat([first.sequences, ids[:, -3:]], dim=1)
    turn_mask = torch.cat([mask, torch.ones(ids.shape[0], turn.shape[1] - mask.shape[1], dtype=mask.dtype,
                                            device=mask.device)], dim=1)
    second = model.generate(turn, attention_mask=turn_mask, past_key_values=cache, **GENERATE)
    return first.sequences, second


def continued_calls(model, ids, mask):
    """Plain forward calls: a prompt, two decode steps, a 3-token continuation, a 2-token one, a decode step (the
    greedy tokens each time, the 2D mask generate() would pass); every call's last logits."""
    decoder = model.get_decoder()
    own_class = hf.stack_cache_class(type(decoder).forward.__get__(decoder))  # MiniMax's (bcg patches the instance)
    cache = hf.new_cache(own_class, model.config)
    logits = []
    with torch.no_grad():
        tokens = ids
        for width in (None, 1, 1, 3, 2, 1):
            if width is not None:
                best = logits[-1].argmax(-1, keepdim=True)
                tokens = torch.cat([best, (best + torch.arange(1, width, device=best.device)) % 125 + 3], 1)[:, :width]
                mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            out = model(input_ids=tokens, attention_mask=mask, use_cache=True, **{_cache_name(model): cache})
            logits.append(out.logits[:, -1])
    return logits


def check_continuations(reference, model, device="cpu", **wrap):
    ids, mask = left_padded_batch(device=device)
    expected = (two_turns(reference, ids, mask), continued_calls(reference, ids, mask))
    handle = bcg.wrap_model(model, **wrap)
    got = (two_turns(model, ids, mask), continued_calls(model, ids, mask))
    for g, e in zip(got[0], expected[0]):
        assert torch.equal(g, e)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    return handle


@pytest.mark.parametrize("arch", FAMILIES)
def test_second_turn_and_continuations_equal_eager(arch):
    handle = check_continuations(tiny_model(arch), tiny_model(arch), backend="eager")
    assert handle.stats()["rejects"] == {}, handle.stats()["rejects"]
    # The continuations replayed, and after decode steps whose graphs hold the mixers (those update state in place).
    assert handle.stats()["replays"] >= 12
    if arch != "minimax" and arch in HYBRID_ARCHITECTURES:
        assert any("/mixers" in kind for kind in handle.stats()["captured_graphs"])


@pytest.mark.parametrize("arch", ["qwen3_5_text", "falcon_h1", "llama"])
def test_prompt_lookup_decoding_equals_eager(arch):
    """Prompt lookup drafts several tokens from the prompt, verifies them in one multi-token call on the cache and
    crops what was rejected (a hybrid's mixers record their past for that)."""
    reference, model = tiny_model(arch), tiny_model(arch)
    ids, mask = left_padded_batch(batch=1, pads=(0,))
    ids = torch.cat([ids, ids[:, 2:6], ids[:, 2:6]], dim=1)  # repeats for the lookup to draft from
    options = dict(GENERATE, max_new_tokens=8, prompt_lookup_num_tokens=3)
    try:
        expected = reference.generate(ids, **options)
    except (ValueError, NotImplementedError, RuntimeError) as error:
        pytest.skip(f"this transformers cannot prompt-lookup {arch}: {error}")
    handle = bcg.wrap_model(model, backend="eager")
    assert torch.equal(model.generate(ids, **options), expected)
    assert handle.stats()["replays"] > 0

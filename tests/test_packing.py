"""Unpadded prefill: a padded multi-token call runs only its real tokens through the graph segments."""

import pytest
import torch
from transformers import DynamicCache

import bcg
from bcg import hf
from bcg.buckets import pick_bucket
from bcg.live import real_rows
from tiny_models import VOCAB, left_padded_batch, tiny_model


def _right_padded(batch=3, seq=9, pads=(3, 0, 5), seed=1):
    ids, mask = left_padded_batch(batch, seq, pads=(0,) * batch, seed=seed)
    for row, pad in enumerate(pads):
        if pad:
            ids[row, -pad:], mask[row, -pad:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3_moe"])  # plain, sliding window, MoE routing
def test_padded_calls_compute_only_real_tokens_and_match_eager(arch, padding):
    reference, model = tiny_model(arch), tiny_model(arch)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = {"left": left_padded_batch, "right": _right_padded,
                 "none": lambda: left_padded_batch(pads=(0, 0, 0))}[padding]()
    real = int(mask.sum())
    with torch.no_grad():
        got = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
    live = mask.bool()
    torch.testing.assert_close(got[live], expected[live], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(got[~live]) == 0  # pad positions hold zeros
    assert handle.stats()["captured_graphs"] == [f"ids:{pick_bucket(handle.runner.sizes, real)}"]  # by real tokens


def test_generate_after_a_packed_prefill_and_cache_contents_match_eager():
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch(batch=4, seq=12, pads=(9, 0, 4, 11))
    caches = []
    for m in (reference, model):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(ids, attention_mask=mask, use_cache=True, **{hf.cache_argument(type(m).forward.__get__(m)): cache})
        caches.append(cache)
    live = mask.bool()
    for expected, got in zip(caches[0].layers, caches[1].layers):
        # real positions hold eager's keys; pad positions are masked out for every later step
        torch.testing.assert_close(got.keys.transpose(1, 2)[live], expected.keys.transpose(1, 2)[live],
                                   atol=1e-5, rtol=1e-5)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_which_calls_are_packed():
    ids, mask = left_padded_batch()
    assert real_rows(mask, 3, 9).tolist() == [i for i in range(27) if mask.reshape(-1)[i]]
    assert real_rows(torch.ones(3, 9, dtype=torch.long), 3, 9) is None  # nothing to drop
    assert real_rows(mask[:, -1:], 3, 1) is None  # decode steps are never packed (no host sync per step)
    assert real_rows(None, 3, 9) is None  # no mask: pads unknown (lm-eval's log-likelihood calls)
    assert real_rows(torch.ones(3, 1, 9, 9), 3, 9) is None  # prepared 4D masks pass through unpacked


def test_a_heavily_padded_batch_replays_instead_of_wasting_a_bucket():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", capture_sizes=[8, 64], max_num_tokens=64)
    ids = torch.randint(3, VOCAB, (4, 16))
    mask = torch.zeros_like(ids)
    mask[:, -2:] = 1  # 8 real tokens of 64: unpacked this would be bucket 64 (fine) — packed it is bucket 8
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert handle.stats()["captured_graphs"] == ["ids:8"] and handle.stats()["replays"] == 1

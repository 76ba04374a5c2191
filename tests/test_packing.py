"""Unpadded prefill: a padded multi-token call runs only its real tokens through the graph segments."""

import pytest
import torch
from transformers import DynamicCache

import bcg
from bcg import hf
from bcg.buckets import pick_bucket
from bcg.live import real_rows
import internals
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
    kind = "ids" if padding == "none" else "ids/fast"  # a padded prompt takes the default mode's fast graphs
    graphs = [internals.without_experts(g) for g in handle.stats()["captured_graphs"]]
    assert graphs == [f"{kind}:{pick_bucket(internals.sizes(handle), real)}"]  # by real tokens


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
    assert real_rows(mask, 3, 9, None).tolist() == [i for i in range(27) if mask.reshape(-1)[i]]
    assert real_rows(torch.ones(3, 9, dtype=torch.long), 3, 9, None) is None  # nothing to drop
    assert real_rows(mask[:, -1:], 3, 1, None) is None  # decode steps are never packed (no host sync per step)
    assert real_rows(None, 3, 9, None) is None  # no mask: pads unknown (lm-eval's log-likelihood calls)
    assert real_rows(torch.ones(3, 1, 9, 9), 3, 9, None) is None  # prepared 4D masks pass through unpacked
    # a mask padded on the right to a static cache's length (Bloom's generate()): the new tokens' columns follow the
    # past
    wide = torch.nn.functional.pad(mask, (0, 5))
    assert real_rows(wide, 3, 9, None).tolist() == real_rows(mask, 3, 9, None).tolist()


def test_a_heavily_padded_batch_replays_instead_of_wasting_a_bucket():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", capture_sizes=[8, 64], max_num_tokens=64)
    ids = torch.randint(3, VOCAB, (4, 16))
    mask = torch.zeros_like(ids)
    mask[:, -2:] = 1  # 8 real tokens of 64: unpacked this would be bucket 64 (fine) — packed it is bucket 8
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert handle.stats()["captured_graphs"] == ["ids/fast:8"] and handle.stats()["replays"] == 1


def _count_per_request_attention(monkeypatch) -> list:
    """Record the sliding window of every per-request attention call (bcg/varlen.py) a break makes."""
    from bcg import varlen
    calls, attention = [], varlen.attention
    monkeypatch.setattr(varlen, "attention", lambda *a, **k: calls.append(a[5]) or attention(*a, **k))
    return calls


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])  # full, all sliding, mixed layer types
def test_default_mode_attends_packed_prompts_per_request_and_exact_mode_does_not(arch, monkeypatch):
    calls = _count_per_request_attention(monkeypatch)
    reference, model = tiny_model(arch), tiny_model(arch)
    ids, mask = left_padded_batch(batch=4, seq=12, pads=(9, 0, 4, 2))  # 12 tokens > the tiny windows of 6
    live = mask.bool()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    for mode, per_request in (("fast", True), ("exact", False)):
        bcg.wrap_model(model, backend="eager", mode=mode)
        calls.clear()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[live], expected[live], atol=1e-5, rtol=1e-5)
        layers = model.config.num_hidden_layers
        windows = [getattr(model.config, "sliding_window", None) if t == "sliding_attention" else None
                   for t in (getattr(model.config, "layer_types", None) or ["full_attention"] * layers)]
        if arch == "mistral":  # no layer types: every layer passes the config's window
            windows = [model.config.sliding_window] * layers
        assert calls == (windows if per_request else [])
        bcg.unwrap_model(model)


@pytest.mark.parametrize("arch, extra, window", [
    ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2), 6),  # a sliding mask, no sliding_window kwarg
    ("olmoe", dict(num_experts=4, num_experts_per_tok=2), None),  # a sliding_window kwarg, a full causal mask
])
def test_per_request_attention_applies_the_window_of_the_mask_eager_applies(arch, extra, window, monkeypatch):
    """SDPA applies the mask the stack built, whatever window the layer's kwargs name: so must the varlen path."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tiny_models import _COMMON

    def build():
        torch.manual_seed(0)
        config = AutoConfig.for_model(arch, **{**_COMMON, **extra, "sliding_window": 6})
        return AutoModelForCausalLM.from_config(config).eval()

    calls = _count_per_request_attention(monkeypatch)
    reference, model = build(), build()
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch(batch=4, seq=16, pads=(13, 0, 4, 15))  # 16 tokens > the window of 6
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert calls == [window] * model.config.num_hidden_layers


def test_masks_with_holes_and_prompts_after_a_past_keep_the_padded_attention(monkeypatch):
    calls = _count_per_request_attention(monkeypatch)
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch(batch=3, seq=9, pads=(3, 0, 5))
    holes = mask.clone()
    holes[1, 4] = 0  # a real token masked out mid-row: the packed run would not be eager's positions
    first, second = ids[:, :5], ids[:, 5:]
    later_mask = mask.clone()
    later_mask[0, -2:] = 0  # right padding in the second chunk: packed, but on a cache with a past
    caches = [DynamicCache(config=m.config) for m in (reference, model)]
    outputs = []
    for m, cache in zip((reference, model), caches):
        name = hf.cache_argument(type(m).forward.__get__(m))
        with torch.no_grad():
            m(first, attention_mask=mask[:, :5], use_cache=True, **{name: cache})  # packed on an empty cache
            later = m(second, attention_mask=later_mask, use_cache=True, **{name: cache}).logits
            outputs.append((later, m(input_ids=ids, attention_mask=holes).logits))
    assert len(calls) == model.config.num_hidden_layers  # the first prompt only
    for got, expected, live in zip(outputs[1], outputs[0], (later_mask[:, 5:].bool(), holes.bool())):
        torch.testing.assert_close(got[live], expected[live], atol=1e-5, rtol=1e-5)


def test_requests_of_a_mask():
    from bcg.varlen import requests_of
    _, left = left_padded_batch(batch=3, seq=9, pads=(3, 0, 5))
    requests = requests_of(left, 9)
    assert requests.lengths == (6, 9, 4) and requests.offsets.tolist() == [0, 6, 15, 19] and requests.longest == 9
    _, right = _right_padded(pads=(3, 0, 9))
    assert requests_of(right, 9).lengths == (6, 9)  # an empty row adds no request
    assert requests_of(torch.tensor([[1, 0, 1]]), 3) is None  # a hole
    assert requests_of(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 2) is None  # wider than the call: eager reads
    # its first columns (a malformed call on an empty cache): the padded path does the same


def test_mask_windows_name_the_window_of_each_mask_transformers_builds():
    from tiny_models import tiny_config
    mixed = tiny_config("gemma3_text")  # sliding and full layer types, window 6
    assert hf.mask_windows(mixed) == {"sliding_attention": 6, "full_attention": None}
    assert hf.mask_windows(tiny_config("mistral")) == {"full_attention": 6}  # no layer types: one sliding mask
    assert hf.mask_windows(tiny_config("llama")) == {"full_attention": None}
    assert hf.mask_windows(tiny_config("moshi"), full_only=True) == {"full_attention": None}  # names a window it never
    # applies (builds_full_masks_only)
    assert hf.mask_windows(tiny_config("llama4_text")) == {"full_attention": None}  # its chunked layers: padded path
    chunked = tiny_config("llama")
    chunked.attention_chunk_size = 8  # no layer types, no window: transformers builds a chunked mask for every layer
    assert hf.mask_windows(chunked) == {}

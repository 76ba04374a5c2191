"""Full-graph decode on static caches (eager backend on CPU): each step one graph, the cache left as eager leaves it."""

import copy
import pickle

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicLayer

import bcg
from bcg import hf
from bcg.backends import LATER_WARMUP_RUNS, WARMUP_RUNS, CudaBackend, EagerBackend
import internals
from tiny_models import left_padded_batch, tiny_model

STEPS = 5
GENERATE = dict(max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def _cache_of(output):
    return getattr(output, "cache", None) or output.past_key_values


def _assert_same_real_cache(got, expected, mask):
    """Equal at the real positions (keys, values and an indexed layer's indexer keys, where it keeps them): a packed
    prefill of a dynamic cache leaves zeros where eager keeps pad tokens'."""
    for a, b in zip(got.layers, expected.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        real = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, a.keys.shape[-2] - mask.shape[1])], 1).bool()
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        indexer_keys = getattr(a, "indexer_keys", None), getattr(b, "indexer_keys", None)
        assert (indexer_keys[0] is None) == (indexer_keys[1] is None)
        if indexer_keys[0] is not None:  # [B, T, D]
            torch.testing.assert_close(indexer_keys[0][real], indexer_keys[1][real], atol=1e-5, rtol=1e-5)


def _assert_same_cache(got, expected):
    """Equal up to fp32 rounding: the prefill ran on the breakable graphs, whose flat [1, N] matmuls can round apart."""
    assert len(got.layers) == len(expected.layers)
    for a, b in zip(got.layers, expected.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        assert int(a.get_seq_length()) == int(b.get_seq_length())


def _static_generate_equals_eager(reference, model) -> dict:
    """generate() on a StaticCache, wrapped (eager backend) and not: the same tokens and cache; the wrapped stats."""
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    expected, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_cache(_cache_of(got), _cache_of(expected))
    return handle.stats()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt", "qwen2_moe"])
def test_static_cache_decode_steps_are_full_graphs_and_match_eager(arch):
    stats = _static_generate_equals_eager(tiny_model(arch), tiny_model(arch))
    assert stats["replays"] == 1 + STEPS and stats["full_graph_replays"] == STEPS and stats["rejects"] == {}


def test_a_later_generate_with_a_new_cache_replays_the_same_graph():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    first = model.generate(ids, **kwargs)
    graphs = dict(internals.full_decoder(handle).graphs)
    second, expected = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert internals.full_decoder(handle).graphs == graphs and len(graphs) == 1  # no capture for the second cache
    assert torch.equal(second.sequences, expected.sequences)
    _assert_same_cache(_cache_of(second), _cache_of(expected))
    _assert_same_cache(_cache_of(first), _cache_of(expected))  # the first cache got its own tensors back intact


def decode_two_caches(m, prompts, steps=3):
    """Prefill two prompts into two StaticCaches, then decode them in turn (greedy, plain forward calls)."""
    caches = [StaticCache(config=m.config, max_cache_len=32) for _ in prompts]
    name = hf.cache_argument(type(m).forward.__get__(m))
    tokens, masks = [], [mask for _, mask in prompts]
    with torch.no_grad():
        for (ids, mask), cache in zip(prompts, caches):
            logits = m(ids, attention_mask=mask, use_cache=True, **{name: cache}).logits
            tokens.append([logits[:, -1].argmax(-1, keepdim=True)])
        for _ in range(steps):
            for i, cache in enumerate(caches):  # alternate: each step rebinds bcg's tensors to the other cache
                masks[i] = torch.cat([masks[i], torch.ones_like(tokens[i][-1])], dim=1)
                logits = m(tokens[i][-1], attention_mask=masks[i], use_cache=True, **{name: cache}).logits
                tokens[i].append(logits[:, -1].argmax(-1, keepdim=True))
    return [torch.cat(t, dim=1) for t in tokens], caches


def test_two_live_static_caches_decoded_in_turn_never_share_storage():
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager")
    prompts = [left_padded_batch(seed=1), left_padded_batch(seed=2)]
    expected, expected_caches = decode_two_caches(reference, prompts)
    got, got_caches = decode_two_caches(model, prompts)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    for e, g in zip(expected_caches, got_caches):
        _assert_same_cache(g, e)
    assert handle.stats()["full_graph_replays"] == 6


def test_a_static_cache_given_its_tensors_back_under_inference_mode_keeps_working_outside_it():
    """Cache A decodes bound to bcg's tensors; cache B then decodes under inference mode (A gets copies back); A's
    next call under no_grad must not meet inference tensors it cannot update."""
    model = tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager")
    (ids, mask), name = left_padded_batch(), hf.cache_argument(type(model).forward.__get__(model))
    caches = [StaticCache(config=model.config, max_cache_len=32) for _ in range(2)]
    step_mask = torch.cat([mask, torch.ones_like(ids[:, :1])], dim=1)
    for cache, context in zip(caches, (torch.no_grad, torch.inference_mode)):
        with context():
            model(ids, attention_mask=mask, use_cache=True, **{name: cache})
            model(ids[:, -1:], attention_mask=step_mask, use_cache=True, **{name: cache})
    with torch.no_grad():  # a 2-token continuation: the breaks update A's keys/values in place
        step_mask = torch.cat([step_mask, torch.ones_like(ids[:, :2])], dim=1)
        model(ids[:, -2:], attention_mask=step_mask, use_cache=True, **{name: caches[0]})
    assert handle.stats()["full_graph_replays"] == 2 and handle.stats()["rejects"] == {}


def test_cache_shapes_beyond_the_kept_few_drop_the_least_recent_with_its_graphs():
    """Three static caches of three lengths decode in turn (A, B, C, A): with room for two shapes, C's arrival drops
    A's tensors and graph (A keeps those tensors) and A's return drops B's; every step equals eager's."""
    check_static_storages_bounded(backend="eager")


def check_static_storages_bounded(device: str = "cpu", **options) -> None:
    reference, model = tiny_model("qwen3", device=device), tiny_model("qwen3", device=device)
    handle = bcg.wrap_model(model, **options)
    (ids, mask), name = left_padded_batch(device=device), hf.cache_argument(type(model).forward.__get__(model))
    results = []
    for m in (reference, model):
        caches = [StaticCache(config=m.config, max_cache_len=n) for n in (32, 40, 48)]
        masks, logits = [mask] * 3, []
        with torch.no_grad():
            for cache in caches:
                m(ids, attention_mask=mask, use_cache=True, **{name: cache})
            for i in (0, 1, 2, 0):
                masks[i] = torch.cat([masks[i], torch.ones_like(ids[:, :1])], dim=1)
                logits.append(m(ids[:, -1:], attention_mask=masks[i], use_cache=True, **{name: caches[i]}).logits)
        results.append(logits)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    decoder = internals.full_decoder(handle)
    assert handle.stats()["full_graph_replays"] == 4
    assert len(decoder.bindings) == len(decoder.graphs) == decoder.bindings.max_storages == 2


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text", "gpt_oss"])
@pytest.mark.parametrize("window, full_graph_steps", [(12, 3), (10, 1), (64, STEPS), (6, 0)])
def test_sliding_window_static_caches_decode_as_full_graphs_until_the_window_is_full(arch, window, full_graph_steps):
    """A sliding layer updates in place until its window is full (a 9-token prompt, window 12: three steps), then rolls
    it (an index built on the host: the breaks). Tokens, cache and its lengths equal eager's either way, with capture
    running cuda's warm-ups (each must find the cache as the step did, Python-side counts included)."""
    stats = _static_generate_equals_eager(tiny_model(arch, sliding_window=window),
                                          tiny_model(arch, sliding_window=window))
    assert stats["full_graph_replays"] == full_graph_steps and stats["replays"] == 1 + STEPS
    assert stats["rejects"] == {} and stats["capture_failures"] == {}


class _GraphLikeReplays:
    """The eager backend, replaying as a CUDA graph does as far as sliding layers' Python-side lengths go: a replay
    reads the lengths the capture saw (a graph keeps what Python computed from them then), and what it adds to them
    is lost (it runs no Python)."""

    name = "eager"

    def __init__(self) -> None:
        self.cache = None  # the cache of the step being replayed

    def capture(self, run, reset=None):
        seen = [length for _, length in hf.host_lengths(hf.static_layers(self.cache))]
        graph = EagerBackend().capture(run, reset)
        replay = graph.replay

        def as_a_graph():
            held = hf.host_lengths(hf.static_layers(self.cache))
            for (layer, _), length in zip(held, seen):
                layer.cumulative_length_int = length
            hidden = replay()
            hf.set_host_lengths(held, 0)
            return hidden

        graph.replay = as_a_graph
        return graph


def wrap_with_graph_like_replays(model):
    """``bcg.wrap_model(model, backend="eager")`` whose full decode graphs replay as ``_GraphLikeReplays``."""
    handle = bcg.wrap_model(model, backend="eager")
    decoder, backend = internals.full_decoder(handle), _GraphLikeReplays()
    decoder.backend, replay = backend, decoder.replay

    def replay_noting_the_cache(key, tokens, live, layers, owned=False):
        backend.cache = live.cache
        return replay(key, tokens, live, layers, owned)

    decoder.replay = replay_noting_the_cache
    return handle


def decode_after_an_eager_prefill(model, ids, mask, *, wrap, steps: int, max_cache_len: int):
    """Greedy decode steps (plain forward calls with 2D padding masks: a full graph builds the masks itself) on a
    StaticCache prefilled before ``wrap(model)`` (None: eager throughout): the tokens, the cache and the handle."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    name = hf.cache_argument(type(model).forward.__get__(model))
    with torch.no_grad():
        tokens = [model(ids, attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1].argmax(-1, True)]
        handle = wrap(model) if wrap else None
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            logits = model(tokens[-1], attention_mask=mask, use_cache=True, **{name: cache}).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), cache, handle


def test_a_replay_advances_the_sliding_layers_python_side_lengths():
    """bcg sets each sliding layer's Python-side length after a replay as the step would have: tokens, cache and
    lengths equal eager's although the graph's replay (as a CUDA graph's) leaves them behind."""
    reference, model = tiny_model("gemma3_text", sliding_window=64), tiny_model("gemma3_text", sliding_window=64)
    handle = wrap_with_graph_like_replays(model)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    expected, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_cache(_cache_of(got), _cache_of(expected))
    assert handle.stats()["full_graph_replays"] == STEPS


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_masks_built_inside_a_graph_follow_the_sliding_layers_lengths(arch):
    """A full graph that builds its masks from a padding mask takes the query's offset from the sliding layers'
    length tensors, not from the Python-side count the capture saw (a replay would keep it: the step's query would
    not see the keys it writes). Plain forward calls, found on an H200."""
    ids, mask = left_padded_batch()
    runs = [decode_after_an_eager_prefill(tiny_model(arch, sliding_window=64), ids, mask, wrap=wrap, steps=3,
                                          max_cache_len=12) for wrap in (None, wrap_with_graph_like_replays)]
    (expected, expected_cache, _), (got, got_cache, handle) = runs
    assert torch.equal(got, expected)
    _assert_same_cache(got_cache, expected_cache)
    assert handle.stats()["full_graph_replays"] == 3 and handle.stats()["rejects"] == {}


def test_the_eager_backend_runs_a_capture_as_cuda_does():
    """Warm-ups (two before a backend's first capture, one before each later), then the run captured, each after the
    reset: CPU tests see what a state-advancing run does on cuda."""
    backend, calls = EagerBackend(), []
    for _ in range(3):
        backend.capture(lambda: calls.append("run"), lambda: calls.append("reset"))
    assert calls == ["reset", "run"] * (WARMUP_RUNS + 1 + 2 * (LATER_WARMUP_RUNS + 1))
    assert EagerBackend.warmup_runs == CudaBackend.warmup_runs == WARMUP_RUNS
    assert EagerBackend.later_warmup_runs == CudaBackend.later_warmup_runs == LATER_WARMUP_RUNS < WARMUP_RUNS


def test_a_stand_in_captured_two_positions_from_its_end_is_not_written_past():
    """A 254-token prompt decodes on a 256-position stand-in: every run of the capture (its warm-ups too, as on cuda)
    writes position 254, not 254..256."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    ids = torch.randint(3, 100, (1, 254), generator=torch.Generator().manual_seed(0))
    kwargs = dict(GENERATE, max_new_tokens=3)
    assert torch.equal(model.generate(ids, **kwargs).sequences, reference.generate(ids, **kwargs).sequences)
    assert handle.stats()["full_graph_replays"] == 2 and handle.stats()["static_cache_bytes"] > 0


def test_warm_up_runs_leave_a_nearly_full_static_cache_as_the_step_found_it():
    """cuda's capture runs the step more than once (warm-ups): each writes the step's own position, not the ones after
    it (two positions from the end they would write past it: an index error, a device-side assert on a GPU)."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    kwargs = dict(GENERATE, attention_mask=mask, cache_implementation="static", max_new_tokens=2)
    expected, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_cache(_cache_of(got), _cache_of(expected))
    assert handle.stats()["full_graph_replays"] == 1 and handle.stats()["capture_failures"] == {}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt"])
def test_static_cache_option_decodes_dynamic_caches_as_full_graphs(arch):
    """static_cache=True: generate()'s own DynamicCache decodes through bcg's static stand-in, one graph per step; the
    tokens and the cache left behind (a DynamicCache, its layers views of the stand-in) are eager's; a second
    generate() (a new cache of the same shape) replays the same graph and leaves the first cache intact."""
    check_stand_in_decode(arch, backend="eager")


def check_stand_in_decode(arch: str, device: str = "cpu", **options) -> None:
    reference, model = tiny_model(arch, device=device), tiny_model(arch, device=device)
    handle = bcg.wrap_model(model, static_cache=True, **options)
    ids, mask = left_padded_batch(device=device)
    expected = reference.generate(ids, attention_mask=mask, **GENERATE)
    first = model.generate(ids, attention_mask=mask, **GENERATE)
    assert torch.equal(first.sequences, expected.sequences)
    assert type(_cache_of(first)) is type(_cache_of(expected))
    _assert_same_real_cache(_cache_of(first), _cache_of(expected), mask)
    stats = handle.stats()
    assert stats["full_graph_replays"] == STEPS and stats["full_graphs"] == 1 and stats["rejects"] == {}
    second = model.generate(ids.flip(0), attention_mask=mask.flip(0), **GENERATE)
    flipped = reference.generate(ids.flip(0), attention_mask=mask.flip(0), **GENERATE)
    assert torch.equal(second.sequences, flipped.sequences)
    assert handle.stats()["full_graphs"] == 1 and handle.stats()["full_graph_replays"] == 2 * STEPS
    _assert_same_real_cache(_cache_of(first), _cache_of(expected), mask)  # the first cache kept its contents
    assert model.generation_config.cache_implementation is None


def test_a_dynamic_cache_outgrowing_its_stand_in_moves_to_a_larger_one():
    """Past the stand-in's positions (256 here) the cache is copied into the next size's stand-in: steps on either
    side equal eager's."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    ids = torch.randint(3, 100, (2, 250), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    expected, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_cache(_cache_of(got), _cache_of(expected))
    assert handle.stats()["full_graphs"] == 2 and handle.stats()["full_graph_replays"] == 9


def test_a_cache_bound_to_a_stand_in_survives_another_cache_and_an_eager_step():
    """Two dynamic caches decode in turn through one stand-in (each handed copies when the other takes it), then a
    2-token step runs on the breaks: every step equals eager's."""
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    bcg.wrap_model(model, backend="eager", static_cache=True)
    (ids, mask), name = left_padded_batch(), hf.cache_argument(type(model).forward.__get__(model))
    results = []
    for m in (reference, model):
        caches, masks, logits = [], [mask, mask], []
        with torch.no_grad():
            for prompt in (ids, ids.flip(1)):
                caches.append(m(prompt, attention_mask=mask, use_cache=True)[name])
            for i, width in ((0, 1), (1, 1), (0, 1), (1, 2), (0, 1)):
                masks[i] = torch.cat([masks[i], torch.ones_like(ids[:, :width])], dim=1)
                logits.append(m(ids[:, -width:], attention_mask=masks[i], use_cache=True, **{name: caches[i]}).logits)
        results.append(logits)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_cropped_cache_still_holding_the_stand_ins_tensors_gets_copies_when_another_takes_it():
    """A crop leaves slices of the stand-in's tensors in the cache; when another cache takes the stand-in, the cropped
    one must get copies, not see the other's keys (then continue as eager's)."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    bcg.wrap_model(model, backend="eager", static_cache=True)
    (ids, mask), name = left_padded_batch(), hf.cache_argument(type(model).forward.__get__(model))
    step = torch.cat([mask, torch.ones_like(ids[:, :1])], dim=1)
    results = []
    for m in (reference, model):
        with torch.no_grad():
            a, b = (m(prompt, attention_mask=mask, use_cache=True)[name] for prompt in (ids, ids.flip(1)))
            m(ids[:, -1:], attention_mask=step, use_cache=True, **{name: a})
            a.crop(-1)  # back to the prompt: slices of the stand-in
            m(ids[:, -1:], attention_mask=step, use_cache=True, **{name: b})
            results.append(m(ids[:, -1:], attention_mask=step, use_cache=True, **{name: a}).logits)
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


def test_bad_static_cache_value_is_refused():
    with pytest.raises(ValueError, match="static_cache"):
        bcg.wrap_model(tiny_model("llama"), backend="eager", static_cache="yes")


def test_a_full_graph_that_cannot_be_captured_falls_back_to_the_breaks_with_one_warning(monkeypatch):
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    decoder = internals.full_decoder(handle)

    class Failing:
        def capture(self, run):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder, "backend", Failing())  # the breakable graphs keep the working backend
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    with pytest.warns(bcg.BcgCaptureWarning, match="full decode graph"):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, reference.generate(ids, **kwargs).sequences)
    stats = handle.stats()
    assert stats["full_graph_replays"] == 0 and stats["replays"] == 1 + STEPS and stats["rejects"] == {}


def test_full_graph_decode_after_an_eager_prefill():
    """The prefill is too large for the buckets (eager); the decode steps still replay as full graphs."""
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")  # qwen3 configs carry layer_types: masks are a dict
    handle = bcg.wrap_model(model, backend="eager", capture_sizes=[1, 2, 4], max_num_tokens=4)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    assert torch.equal(model.generate(ids, **kwargs).sequences, reference.generate(ids, **kwargs).sequences)
    stats = handle.stats()
    assert stats["full_graph_replays"] == STEPS and stats["rejects"] == {"too_many_tokens": 1}


def test_a_cast_after_full_graph_decode_drops_those_graphs_too():
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager", capture_sizes=[1, 2, 4], max_num_tokens=4)  # full graphs only
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GENERATE)
    model.generate(ids, **kwargs)
    assert handle.stats()["full_graphs"] == 1 and handle.stats()["captured"] == []
    model.double()
    reference.double()
    with pytest.warns(bcg.BcgInvalidatedWarning):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, reference.generate(ids, **kwargs).sequences)
    assert handle.stats()["invalidations"] == 1 and handle.stats()["full_graph_replays"] == 2 * STEPS


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_fast_full_graphs_hand_grouped_keys_to_sdpa_beside_the_mask_exact_ones_repeat_them(mode, monkeypatch):
    """A padded decode step's full graph: the default mode's SDPA takes the mask and the grouped keys as they are
    (enable_gqa), exact mode's repeats them per query head as eager does; both decode eager's tokens."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, enable_gqa=False, **kwargs):
        calls.append((key.shape[2], key.shape[1], attn_mask is not None, enable_gqa))
        return sdpa(query, key, value, attn_mask, *args, enable_gqa=enable_gqa, **kwargs)

    reference, model = tiny_model("qwen3"), tiny_model("qwen3")  # 4 query heads, 2 key/value heads
    handle = bcg.wrap_model(model, backend="eager", static_cache=True, mode=mode)
    ids, mask = left_padded_batch()
    expected = reference.generate(ids, attention_mask=mask, **GENERATE)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    got = model.generate(ids, attention_mask=mask, **GENERATE)
    assert torch.equal(got.sequences, expected.sequences)
    assert handle.stats()["full_graph_replays"] == STEPS
    steps = {call[1:] for call in calls if call[0] == 256}  # over the stand-in's 256 positions: the decode steps
    if mode == "fast":
        assert steps == {(2, True, True)}
    else:  # eager's code: keys/values repeated per query head, or (transformers 5.24) query heads packed per group
        assert steps in ({(4, True, False)}, {(2, True, False)})
    from transformers.integrations import sdpa_attention
    assert sdpa_attention.use_gqa_in_sdpa.__module__ == sdpa_attention.__name__  # put back after the capture


def test_full_graph_steps_build_their_masks_from_the_padding_mask_inside_the_graph():
    """A step's 2D mask goes into the graph as a buffer as wide as the cache (the masks are transformers' own, built
    inside); masks generate() prepared itself (4D, static caches) are copied as they are. Both decode as eager."""
    model = tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    ids, mask = left_padded_batch()
    model.generate(ids, attention_mask=mask, **GENERATE)  # a dynamic cache: its stand-in of 256 positions
    model.generate(ids, attention_mask=mask, cache_implementation="static", **GENERATE)
    stand_in = [entry.masks for entry in internals.stand_in_decoder(handle).graphs.values()]
    assert [(m.shape, m.dtype) for m in stand_in] == [((3, 256), mask.dtype)]
    prepared = [entry.masks for entry in internals.full_decoder(handle).graphs.values()]
    assert len(prepared) == 1 and all(m.ndim == 4 for m in (prepared[0].values() if isinstance(prepared[0], dict)
                                                           else [prepared[0]]))


def test_a_stand_in_made_again_while_its_shape_keeps_the_old_tensors_still_decodes_as_eager():
    """With room for one stand-in, two batch sizes in turn drop and make stand-ins again, while the full graphs keep
    reading the first stand-in's tensors: the new one is bound to those, its layers no longer its own stacked tensors
    (the per-layer views serve); every generate() equals eager's, the caches too."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    internals.stand_ins(handle).bindings.max_storages = 1
    for batch in (3, 2, 3):
        ids, mask = left_padded_batch(batch=batch)
        expected = reference.generate(ids, attention_mask=mask, **GENERATE)
        got = model.generate(ids, attention_mask=mask, **GENERATE)
        assert torch.equal(got.sequences, expected.sequences)
        _assert_same_real_cache(_cache_of(got), _cache_of(expected), mask)
    assert handle.stats()["full_graph_replays"] == 3 * STEPS and handle.stats()["full_graphs"] == 2
    # the graphs' tensors for batch 3 and 2; the second batch-3 stand-in let its own tensors go
    assert handle.stats()["static_cache_bytes"] == (3 + 2) * 2 * 2 * 2 * 256 * 16 * 4


def test_beam_search_on_a_static_cache_binds_the_reordered_layers_again():
    """Beam search reorders a StaticCache by giving its layers new tensors: the next step copies them into bcg's
    tensors and binds the layers to those again (a CUDA graph reads nothing else), and decodes as eager."""
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager")
    decoder, bound = internals.full_decoder(handle), []
    replay = decoder.replay

    def checked_replay(key, tokens, live, layers, owned=False):
        hidden = replay(key, tokens, live, layers, owned)
        storage = decoder.bindings.latest()
        bound.append(all(hf.static_layer_tensors(layer)[0] is buffers[0]
                         for layer, (buffers, _) in zip(hf.static_layers(live.cache), storage.layers, strict=True)))
        return hidden

    decoder.replay = checked_replay
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, num_beams=2, cache_implementation="static", **GENERATE)
    assert torch.equal(model.generate(ids, **kwargs).sequences, reference.generate(ids, **kwargs).sequences)
    assert handle.stats()["full_graph_replays"] == STEPS and bound == [True] * STEPS


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_in_graph_masks_follow_the_attention_implementation_and_an_absent_mask(implementation):
    """The masks a full graph builds inside itself are the implementation's own (boolean for SDPA, additive for eager);
    plain forward calls on a StaticCache without any mask decode as eager, through the same graphs."""
    reference, model = (tiny_model("llama", attn_implementation=implementation) for _ in range(2))
    handle = bcg.wrap_model(model, backend="eager")
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    name = hf.cache_argument(type(model).forward.__get__(model))
    results = []
    for m in (reference, model):
        cache, steps = StaticCache(config=m.config, max_cache_len=24), []
        with torch.no_grad():
            token = m(ids, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
            for _ in range(STEPS):
                logits = m(token, use_cache=True, **{name: cache}).logits
                steps.append(logits)
                token = logits[:, -1:].argmax(-1)
        results.append(steps)
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert handle.stats()["full_graph_replays"] == STEPS
    masks = [entry.masks for entry in internals.full_decoder(handle).graphs.values()]
    if hf.masks_build_in_graphs(model.config._attn_implementation):
        assert masks == [None]  # built inside the graph: no padding mask to copy
    else:  # eager attention before 5.21: transformers' additive mask, built before each replay and copied in
        assert len(masks) == 1 and masks[0].is_floating_point()


def test_a_stand_in_too_large_for_the_free_memory_is_not_made_and_the_breaks_serve(monkeypatch):
    """static_cache=True never allocates a stand-in larger than half the device's free memory: those steps take the
    breaks (one warning naming the sizes and the fix) and decode as eager."""
    import bcg.stand_ins

    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    monkeypatch.setattr(bcg.stand_ins, "free_device_memory", lambda device: 100_000)  # a 256-position stand-in: 192 KiB
    ids, mask = left_padded_batch()
    with pytest.warns(bcg.BcgFallbackWarning, match="more than half of the 0 MiB free") as caught:
        got = model.generate(ids, attention_mask=mask, **GENERATE)
        model.generate(ids, attention_mask=mask, **GENERATE)
    assert len([w for w in caught if issubclass(w.category, bcg.BcgFallbackWarning)]) == 1
    assert torch.equal(got.sequences, reference.generate(ids, attention_mask=mask, **GENERATE).sequences)
    stats = handle.stats()
    assert stats["full_graph_replays"] == 0 and stats["replays"] == 2 * (1 + STEPS)
    assert not internals.stand_ins(handle).bindings


def test_masked_gqa_applies_to_the_capturing_thread_only_and_is_put_back_after_overlapping_captures():
    """Two threads inside hf.masked_gqa_in_sdpa at once, leaving in the order they did not enter: transformers' own
    choice is back afterwards, and a thread outside never sees the masked GQA."""
    import threading

    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    key, mask = torch.zeros(1, 2, 4, 16), torch.ones(1, 1, 1, 4, dtype=torch.bool)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with hf.masked_gqa_in_sdpa():
            seen["first"] = sdpa_attention.use_gqa_in_sdpa(mask, key, key)
            first_in.set()
            second_in.wait()
        first_out.set()

    def second():
        first_in.wait()
        with hf.masked_gqa_in_sdpa():
            second_in.set()
            first_out.wait()
            seen["second, after the first left"] = sdpa_attention.use_gqa_in_sdpa(mask, key, key)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_in.wait()
    seen["outside"] = sdpa_attention.use_gqa_in_sdpa(mask, key, key)
    for thread in threads:
        thread.join()
    assert seen == {"first": True, "outside": False, "second, after the first left": True}
    assert sdpa_attention.use_gqa_in_sdpa is original


def test_stats_report_the_static_cache_memory_bcg_holds():
    """static_cache_bytes: a stand-in of 256 positions (its keys and values once, though bcg's storage for the shape
    reads the same tensors); two batch sizes, two stand-ins; nothing before any decode step."""
    model = tiny_model("llama")  # 2 layers, 2 key/value heads of 16, fp32
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    assert handle.stats()["static_cache_bytes"] == 0
    per_sequence = 2 * 2 * 2 * 256 * 16 * 4  # layers x (keys, values) x heads x positions x head dim x bytes
    for batch, held in ((3, 3), (2, 5)):
        ids, mask = left_padded_batch(batch=batch)
        model.generate(ids, attention_mask=mask, **GENERATE)
        assert handle.stats()["static_cache_bytes"] == held * per_sequence


def test_a_step_with_a_mask_narrower_than_the_cache_does_not_see_an_earlier_wider_masks_columns():
    """A stand-in's graph reads one padding-mask buffer as wide as the cache, written only as far as each step's mask
    reaches (a decode step's mask grows by a column: nothing to clear). A mask shorter than the cache masks the
    positions past it, as transformers pads it, so the ones a wider mask left there must be cleared: eager's logits."""
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    (ids, mask), name = left_padded_batch(), hf.cache_argument(type(model).forward.__get__(model))
    ones = torch.ones_like(ids[:, :1])
    widths = (1, 2, 3, 2)  # columns past the prompt's mask; the last step's mask ends two positions short
    results = []
    for m in (reference, model):
        logits = []
        with torch.no_grad():
            cache = m(ids, attention_mask=mask, use_cache=True)[name]
            for width in widths:
                step_mask = torch.cat([mask, ones.expand(-1, width)], dim=1)
                logits.append(m(ids[:, -1:], attention_mask=step_mask, use_cache=True, **{name: cache}).logits)
        results.append(logits)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert handle.stats()["full_graph_replays"] == len(widths) and handle.stats()["rejects"] == {}


def test_a_cache_decoded_on_a_stand_in_copies_and_pickles_as_plain_compact_dynamic_layers():
    """After stand-in steps a dynamic cache's layers read the stand-in (views made when read); a deep copy or a pickle
    of the cache holds plain DynamicLayers with copies of just what they show, and either continues as eager's does."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    bcg.wrap_model(model, backend="eager", static_cache=True)
    (ids, mask), name = left_padded_batch(), hf.cache_argument(type(model).forward.__get__(model))
    expected, got = (m.generate(ids, attention_mask=mask, **GENERATE) for m in (reference, model))
    cache = _cache_of(got)
    assert {type(layer).__name__ for layer in cache.layers} == {"StandInLayer"}
    step = (got.sequences[:, -1:], torch.cat([mask, torch.ones_like(got.sequences[:, mask.shape[1]:])], dim=1))
    with torch.no_grad():
        want = reference(step[0], attention_mask=step[1], **{name: _cache_of(expected)}).logits
        for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
            assert {type(layer) for layer in copied.layers} == {DynamicLayer}
            assert all(t.untyped_storage().nbytes() == t.nbytes for layer in copied.layers
                       for t in (layer.keys, layer.values))
            _assert_same_real_cache(copied, cache, mask)
            torch.testing.assert_close(reference(step[0], attention_mask=step[1], **{name: copied}).logits, want,
                                       atol=1e-5, rtol=1e-5)

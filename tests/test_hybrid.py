"""Hybrid models on CPU (eager backend, fp32): stateful mixers run as breaks; outputs and cache state equal eager's."""


from typing import Any

import pytest
import torch

import bcg
from bcg import hf, probe
import internals
from test_continuation import check_continuations
from test_latent_attention import _pair, replayed_equal_to_eager
from tiny_models import HYBRID_ARCHITECTURES, left_padded_batch, tiny_model

STEPS = 3


def _cache_tensors(cache, mask: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a cache holds: keys/values at the real positions of ``mask`` (a packed prefill leaves zeros at
    pads, eager the pad tokens' keys) and the mixers' convolution and recurrent states."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                tensors.append(getattr(layer, name).transpose(1, 2)[mask.bool()])
        for name in ("conv_states", "recurrent_states"):
            tensors.extend(t for t in (getattr(layer, name, None) or {}).values() if isinstance(t, torch.Tensor))
    tensors.extend(t for t in getattr(cache, "linear_cache", ()) if isinstance(t, torch.Tensor))  # MiniMax
    return tensors


def _steps(model, ids, mask) -> tuple[list[torch.Tensor], Any, torch.Tensor]:
    """Prefill, a 2-token continuation, then greedy decode steps, each with the 2D mask generate() would pass."""
    own_class = hf.stack_cache_class(type(model.get_decoder()).forward.__get__(model.get_decoder()))  # MiniMax's
    cache = hf.new_cache(own_class, model.config)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **{_cache_name(model): cache}, use_cache=True)
        logits.append(out.logits[:, -1])
        tokens = torch.cat([out.logits[:, -1:].argmax(-1), out.logits[:, -1:].argmax(-1).flip(0)], dim=1)
        for step in range(STEPS + 1):
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            out = model(input_ids=tokens, attention_mask=mask, **{_cache_name(model): cache}, use_cache=True)
            logits.append(out.logits[:, -1])
            tokens = out.logits[:, -1:].argmax(-1)
    return logits, cache, mask


def _cache_name(model) -> str:
    return hf.cache_argument(model.forward)


@pytest.mark.parametrize("arch", sorted(HYBRID_ARCHITECTURES))
def test_each_step_and_the_state_left_in_the_cache_equal_eagers(arch):
    reference = tiny_model(arch)
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    expected_logits, expected_cache, final_mask = _steps(reference, ids, mask)

    handle = bcg.wrap_model(model, backend="eager")
    logits, cache, _ = _steps(model, ids, mask)

    assert handle.stats()["rejects"] == {} and handle.stats()["replays"] == STEPS + 2
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got_tensors, want_tensors = _cache_tensors(cache, final_mask), _cache_tensors(expected_cache, final_mask)
    assert len(got_tensors) == len(want_tensors) > 0
    mixer_states = [t for layer in cache.layers for t in (getattr(layer, "conv_states", None) or {}).values()]
    mixer_states += list(getattr(cache, "linear_cache", ()))
    assert any(any(t is state for state in mixer_states) for t in got_tensors)  # the mixers' states are among them
    for got, want in zip(got_tensors, want_tensors):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Decode steps ran their mixers inside the graph (MiniMax's own cache class keeps them as breaks).
    inline = [g for g in handle.stats()["captured_graphs"] if "/mixers" in g]
    assert bool(inline) == (arch != "minimax"), handle.stats()["captured_graphs"]


def _decode(model, cache, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask, **{_cache_name(model): cache}, use_cache=True)
    return out.logits[:, -1]


@pytest.mark.parametrize("arch", ["qwen3_5_text", "bamba", "lfm2"])
def test_two_caches_decoding_in_turn_keep_their_own_mixer_states(arch):
    """Decode steps bind a cache's mixer states to bcg's tensors: a second cache taking them must leave the first
    with its own contents (copies), so each continues as eager's would."""
    check_two_caches_decoding_in_turn(arch, backend="eager")


def check_two_caches_decoding_in_turn(arch: str, device: str = "cpu", **options: Any) -> None:
    """Two caches prefilled, then decoding in turn (A, B, A, B), eager vs wrapped: logits and caches equal."""
    reference, model = tiny_model(arch, device=device), tiny_model(arch, device=device)
    handle = bcg.wrap_model(model, **options)
    ids, mask = left_padded_batch(device=device)
    results = []
    for m in (reference, model):
        caches = [hf.new_cache(hf.stack_cache_class(m.get_decoder().forward), m.config) for _ in range(2)]
        logits = []
        with torch.no_grad():
            for cache, prompt in zip(caches, (ids, ids.flip(1))):
                m(input_ids=prompt, attention_mask=mask, **{_cache_name(m): cache}, use_cache=True)
        masks, token = [mask, mask], ids[:, -1:]
        for i in (0, 1, 0, 1):  # A, B, A again, B again
            masks[i] = torch.cat([masks[i], torch.ones_like(token)], dim=1)
            logits.append(_decode(m, caches[i], token, masks[i]))
        results.append((logits, caches))
    (expected, expected_caches), (got, caches) = results
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    for cache, expected_cache, final_mask in zip(caches, expected_caches, masks):
        got_tensors, want_tensors = _cache_tensors(cache, final_mask), _cache_tensors(expected_cache, final_mask)
        assert len(got_tensors) == len(want_tensors) > 0
        for g, e in zip(got_tensors, want_tensors):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert handle.stats()["rejects"] == {}
    assert sum("/mixers" in g for g in handle.stats()["captured_graphs"]) == 1  # one shape, one graph, two caches


@pytest.mark.parametrize("arch", ["qwen3_5_text", "falcon_h1"])
def test_beam_search_reordering_mixer_states_equals_eager(arch):
    """Beam search reorders every cache layer between steps (a new tensor per state): bcg copies it in again."""
    reference, model = tiny_model(arch), tiny_model(arch)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    expected = reference.generate(ids, **kwargs)
    handle = bcg.wrap_model(model, backend="eager")
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert handle.stats()["rejects"] == {} and any("/mixers" in g for g in handle.stats()["captured_graphs"])


@pytest.mark.parametrize("arch, breaks", [("qwen3_5_text", 4), ("falcon_h1", 8), ("lfm2", 4), ("jamba", 4)])
def test_every_mixer_and_attention_is_its_own_break(arch, breaks):
    """Falcon-H1 runs a Mamba2 mixer beside attention in every layer: two breaks per layer; LFM2's convolutions and
    Qwen3.5's Gated DeltaNet one per layer."""
    model = tiny_model(arch)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    kinds = [type(slot).__name__ for slot in internals.slots(handle, "ids/fast")]
    assert len(kinds) == breaks and "MixerSlot" in kinds and "BreakSlot" in kinds


def _mixer_names(model) -> list[str]:
    from bcg.mixers import find_module_breaks
    from bcg.resolve import find_stack

    names = {id(module): name for name, module in model.named_modules()}
    breaks, reason = find_module_breaks(find_stack(model), torch.device("cpu"))
    return [names[id(m)] for m in breaks.modules]


def test_mixers_are_found_by_what_they_do_with_the_cache_and_attention_is_not_a_mixer():
    model = tiny_model("falcon_h1")
    assert _mixer_names(model) == [f"model.layers.{i}.mamba" for i in range(model.config.num_hidden_layers)]
    assert _mixer_names(tiny_model("llama")) == []


def test_a_mixer_whose_state_code_moved_out_of_its_class_is_still_found(monkeypatch):
    """transformers 5.25 moved the convolution's state handling into a module-level function: whatever function the
    mixer calls to touch the cache, the probe sees the mixer touch it (simulated: a new module-level helper)."""
    import sys

    model = tiny_model("qwen3_5_text")
    mixer_class = type(model.model.layers[0].linear_attn)
    modeling = sys.modules[mixer_class.__module__]
    original = mixer_class.forward

    def moved_helper(cache, layer_idx):  # the state access now lives outside the mixer's class
        return cache.get_recurrent_state(layer_idx, state_idx=0) if cache is not None else None

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        modeling._bcg_test_moved_helper(cache, self.layer_idx)
        return original(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(modeling, "_bcg_test_moved_helper", moved_helper, raising=False)
    monkeypatch.setattr(mixer_class, "forward", forward)
    assert _mixer_names(model) == [f"model.layers.{i}.linear_attn" for i in (0, 1, 3)]


def test_a_hybrid_whose_mixer_bcg_does_not_recognise_stays_eager_naming_the_layers(monkeypatch):
    reference = tiny_model("qwen3_5_text")
    model = tiny_model("qwen3_5_text")
    ids, mask = left_padded_batch()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    monkeypatch.setattr(probe, "module_breaks", lambda uses: [])
    with pytest.warns(bcg.BcgFallbackWarning, match=r"layers \[0, 1, 3\] \(linear_attention\) are no plain attention"):
        handle = bcg.wrap_model(model, backend="eager")
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert handle.stats()["replays"] == 0 and torch.equal(tokens, expected)


def test_minimax_runs_its_own_cache_class_and_tuple_returning_mixers():
    """MiniMax's stack makes a MiniMaxCache for itself (its cache argument's annotation says so): bcg makes the same
    when a call brings none, accepts it on later calls, and hands its lightning attention (which returns a tuple)
    its tuple back."""
    model = tiny_model("minimax")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out[hf.cache_argument(model.forward)] if hasattr(out, "keys") else None
    assert type(cache).__name__ == "MiniMaxCache"
    assert any(isinstance(slot.module, torch.nn.Module) and slot.returns_tuple
               for slot in internals.slots(handle, "ids/fast") if type(slot).__name__ == "MixerSlot")
    assert handle.stats()["rejects"] == {}


@pytest.mark.parametrize("arch", ["qwen3_5_text", "falcon_h1"])
def test_unwrap_restores_the_mixers(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    bcg.wrap_model(model, backend="eager")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    bcg.unwrap_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_a_layer_whose_code_also_touches_the_state_is_not_taken_for_its_mixer(monkeypatch):
    """Only the innermost stateful module becomes a break: routing both a layer and its mixer would nest breaks."""
    model = tiny_model("qwen3_5_text")
    layer_class = type(model.model.layers[0])
    original = layer_class.forward

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            cache.get_seq_length()  # the layer's own code touches the cache too
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", forward)
    for i, layer in enumerate(model.model.layers):
        layer.layer_idx = i  # so that a layer qualifies as a mixer by itself
    uses = {id(use.module): use for use in probe.cache_uses(model.model, model.config, hf.stack_cache_class(
        model.model.forward), hf.cache_argument(model.model.forward), torch.device("cpu"))}
    assert uses[id(model.model.layers[0])].touched  # the layer is seen touching the cache
    assert _mixer_names(model) == [f"model.layers.{i}.linear_attn" for i in (0, 1, 3)]


@pytest.mark.parametrize("arch", ["qwen3_5_text", "falcon_h1", "lfm2"])
def test_static_cache_generate_and_sampling_equal_eagers(arch):
    """generate() on a StaticCache (its mixer layers hold state beside the static keys/values: the breaks take it)
    and seeded sampling both give eager's tokens."""
    reference = tiny_model(arch)
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    static = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    sampled = dict(max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    expected_static = reference.generate(ids, attention_mask=mask, **static)
    torch.manual_seed(7)
    expected_sampled = reference.generate(ids, attention_mask=mask, **sampled)

    handle = bcg.wrap_model(model, backend="eager")
    tokens_static = model.generate(ids, attention_mask=mask, **static)
    torch.manual_seed(7)
    tokens_sampled = model.generate(ids, attention_mask=mask, **sampled)

    assert torch.equal(tokens_static, expected_static) and torch.equal(tokens_sampled, expected_sampled)
    assert handle.stats()["rejects"] == {} and handle.stats()["full_graph_replays"] == 0


@pytest.mark.parametrize("arch", ["qwen3_5_text", "lfm2", "bamba"])
def test_a_prepared_4d_mask_gives_the_mixers_what_transformers_gives_them(arch):
    """A caller's 4D float mask: attention reads it, the mixers get None (as transformers hands them), and the
    logits equal eager's."""
    reference = tiny_model(arch)
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    seq = ids.shape[1]
    allowed = torch.ones(seq, seq).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    mask_4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask_4d).logits
    handle = bcg.wrap_model(model, backend="eager")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask_4d).logits
    assert handle.stats()["replays"] == 1 and handle.stats()["rejects"] == {}
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)


def test_an_attention_free_model_stays_eager_saying_so():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mamba", hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(bcg.BcgFallbackWarning, match="attention-free model"):
        handle = bcg.wrap_model(model, backend="eager")
    assert not handle.stats()["ready"]


@pytest.mark.parametrize("arch", ["qwen3_5_text", "lfm2", "jamba"])
def test_inputs_embeds_and_bf16_autocast_equal_eagers(arch):
    """Prompts given as embeddings (graph kind "embeds") and generate() under bf16 autocast (graphs per autocast state)
    with the mixers as breaks give eager's tokens."""
    reference = tiny_model(arch)
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    embeds = reference.get_input_embeddings()(ids)
    expected_embeds = reference.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_autocast = reference.generate(ids, attention_mask=mask, **generate)

    handle = bcg.wrap_model(model, backend="eager")
    tokens_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens_autocast = model.generate(ids, attention_mask=mask, **generate)

    assert torch.equal(tokens_embeds, expected_embeds) and torch.equal(tokens_autocast, expected_autocast)
    kinds = {internals.without_experts(graph.split(":")[0]) for graph in handle.stats()["captured_graphs"]}
    assert {"embeds/fast", "ids@autocast-bfloat16/fast"} <= kinds and handle.stats()["rejects"] == {}


def test_a_cache_of_another_class_than_minimaxs_own_is_refused_before_any_break():
    """MiniMax raises for a cache that is not its MiniMaxCache; bcg refuses the call up front (eager then raises the
    model's own error) instead of failing in a mixer's break with the cache half-updated."""
    from transformers import DynamicCache

    model = tiny_model("minimax")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    cache = {hf.cache_argument(model.forward): DynamicCache(config=model.config)}
    with torch.no_grad(), pytest.warns(bcg.BcgFallbackWarning, match="MiniMaxCache of its own"):
        with pytest.raises(ValueError, match="MiniMax"):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **cache)
    assert handle.stats()["rejects"] == {"unsupported_cache": 1}


def test_relayout_puts_a_flat_runs_per_token_tensor_in_the_calls_batch_layout():
    from bcg.live import LiveContext

    flat = torch.arange(8 * 2, dtype=torch.float32).view(1, 8, 2)  # bucket 8, 2 features per token
    unpacked = LiveContext(batch=2, seq=3, num_tokens=6, bucket=8)
    assert torch.equal(unpacked.relayout(flat), flat[0, :6].view(2, 3, 2))
    packed = LiveContext(batch=2, seq=3, num_tokens=4, bucket=8, rows=torch.tensor([1, 2, 4, 5]))
    expected = torch.zeros(6, 2)
    expected[[1, 2, 4, 5]] = flat[0, :4]
    assert torch.equal(packed.relayout(flat), expected.view(2, 3, 2))


def test_a_per_call_tensor_a_mixer_break_cannot_supply_keeps_the_model_eager(monkeypatch):
    """Only per-token tensors the graph computes from positions are handed on; anything else a mixer takes per call
    could hold capture-time state, so the model stays eager, naming the argument."""
    monkeypatch.setattr(bcg.mixers, "_GRAPH_ARGUMENTS", frozenset())
    reference = tiny_model("zamba2")
    model = tiny_model("zamba2")
    ids, mask = left_padded_batch()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.warns(bcg.BcgFallbackWarning, match=r"takes \['position_embeddings'\] per call"):
        handle = bcg.wrap_model(model, backend="eager")
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected) and not handle.stats()["ready"]


def test_a_cache_given_its_states_back_under_inference_mode_keeps_working_outside_it():
    """Cache A bound, then cache B decodes under inference mode (A gets copies back): A's next call under no_grad
    must not meet inference tensors it cannot update."""
    reference, model = tiny_model("qwen3_5_text"), tiny_model("qwen3_5_text")
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    step_mask = torch.cat([mask, torch.ones_like(ids[:, :1])], dim=1)
    results = []
    for m in (reference, model):
        name = _cache_name(m)
        with torch.no_grad():
            a = m(input_ids=ids, attention_mask=mask, use_cache=True)[name]
            _decode(m, a, ids[:, -1:], step_mask)
        with torch.inference_mode():
            b = m(input_ids=ids, attention_mask=mask, use_cache=True)[name]
            _decode(m, b, ids[:, -1:], step_mask)
        with torch.no_grad():  # a 2-token continuation: the mixers run eagerly on A's states
            two = torch.cat([step_mask, torch.ones_like(ids[:, :2])], dim=1)
            results.append(m(input_ids=ids[:, -2:], attention_mask=two, use_cache=True, **{name: a}).logits)
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def test_mixer_states_kept_for_a_few_batch_sizes_and_a_dropped_ones_graphs_freed():
    """Each batch size has its own mixer states and decode graph: beyond ``max_storages`` the least recently used
    goes, its graphs with it, and a cache bound to it keeps its contents."""
    check_mixer_storages_bounded(backend="eager")


def check_mixer_storages_bounded(device: str = "cpu", **options: Any) -> None:
    """Batch sizes 3, 2, 1, 3 decode in turn with room for two storages, eager vs wrapped: equal logits."""
    reference, model = tiny_model("qwen3_5_text", device=device), tiny_model("qwen3_5_text", device=device)
    handle = bcg.wrap_model(model, **options)
    internals.mixer_states(handle).bindings.max_storages = 2
    ids, mask = left_padded_batch(device=device)
    results = []
    for m in (reference, model):
        name, logits, caches = _cache_name(m), [], {}
        for batch in (3, 2, 1, 3):  # the storage of 3 is dropped when 1 arrives, then made again
            with torch.no_grad():
                cache = caches.get(batch) or m(input_ids=ids[:batch], attention_mask=mask[:batch], use_cache=True)[name]
            caches[batch] = cache
            grown = torch.ones_like(mask[:batch, :1]).expand(batch, cache.get_seq_length() - mask.shape[1] + 1)
            logits.append(_decode(m, cache, ids[:batch, -1:], torch.cat([mask[:batch], grown], dim=1)))
        results.append(logits)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    inline = [g for g in handle.stats()["captured_graphs"] if "/mixers" in g]
    assert len(inline) == 2 and len(internals.mixer_states(handle).bindings) == 2, inline
    assert handle.stats()["rejects"] == {}


# Attention modules that run short convolutions on the cache themselves (their keys' and values', or Zaya's CCA
# projection) and attend with tensors of their own making (Inkling's position bias, Inkling 2's sinks) or take their
# masks in a dict (Zaya): each runs whole as a break of its own, handed what the unwrapped stack hands it. A full and a
# sliding-window layer each; the window (6) bites within the test sequences.
CONVOLVING_ATTENTION = {
    "inkling_text": dict(layer_types=["hybrid", "hybrid_sliding"]),
    "inkling2_text": dict(num_hidden_layers=4, layer_types=["hybrid", "hybrid_sliding"] * 2),
    "zaya": dict(layer_types=["hybrid", "hybrid_sliding"], sliding_window=6),
}


@pytest.mark.parametrize("model_type", sorted(CONVOLVING_ATTENTION))
def test_attention_convolving_on_the_cache_is_a_break_of_its_own_and_equals_eager(model_type):
    reference, model = _pair(model_type, **CONVOLVING_ATTENTION[model_type])
    slots = replayed_equal_to_eager(reference, model)
    attending = [s for s in slots if s.attends]
    assert [s.layer_idx for s in attending] == list(range(model.config.num_hidden_layers))
    assert all("Attention" in type(s.module).__name__ for s in attending)
    # Inkling's layers also run a short convolution after attention and after the MLP: breaks of their own. Inkling
    # 2's attention over its block states touches no cache and stays inside the graph.
    assert all("ShortConvolution" in type(s.module).__name__ for s in slots if not s.attends)


@pytest.mark.parametrize("model_type", sorted(CONVOLVING_ATTENTION))
def test_attention_convolving_on_the_cache_continues_as_eager(model_type):
    """A second generate() turn and k-token calls on a past, decode steps through the breaks."""
    reference, model = _pair(model_type, **CONVOLVING_ATTENTION[model_type])
    handle = check_continuations(reference, model, backend="eager")
    stats = handle.stats()
    assert stats["rejects"] == {} and stats["replays"] >= 12 and stats["full_graph_replays"] == 0


@pytest.mark.parametrize("model_type", sorted(CONVOLVING_ATTENTION))
def test_a_module_break_gets_the_masks_the_stack_hands_it(model_type, monkeypatch):
    """Each attention module's attention mask (Inkling's sliding layers: the window's) and its convolutions' padding
    mask (``conv_mask``; Zaya: both in one dict) are, call for call, what the unwrapped model hands it: a padded
    prompt, then a 3-token continuation on its cache."""
    reference, model = _pair(model_type, **CONVOLVING_ATTENTION[model_type])
    handed = _record_masks(monkeypatch, {type(layer.self_attn) for layer in reference.model.layers})
    ids, mask = left_padded_batch()
    handle = bcg.wrap_model(model, backend="eager")
    for twin in (reference, model):
        name = _cache_name(twin)
        with torch.no_grad():
            cache = twin(input_ids=ids, attention_mask=mask, use_cache=True)[name]
            more = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
            twin(input_ids=ids[:, -3:], attention_mask=more, use_cache=True, **{name: cache})
    assert handle.stats()["replays"] == 2
    for ours, theirs in zip(model.model.layers, reference.model.layers):
        got, expected = handed[id(ours.self_attn)], handed[id(theirs.self_attn)]
        assert len(got) == len(expected) == 2
        for call, call_expected in zip(got, expected):
            assert call.keys() == call_expected.keys() and all(
                _same(call[k], call_expected[k]) for k in call), (call, call_expected)


def _record_masks(monkeypatch, classes: set[type]) -> dict[int, list[dict]]:
    """Per module (by id), the masks each live call of the classes' forward got (capture runs, one flat [1, N] run,
    left out), a dict's entries by key."""
    handed: dict[int, list[dict]] = {}
    for klass in classes:
        def forward(self, *args, _original=klass.forward, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if hidden.shape[0] > 1:
                handed.setdefault(id(self), []).append(_masks_of(kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(klass, "forward", forward)
    return handed


def _masks_of(kwargs: dict) -> dict:
    masks = {}
    for name in ("attention_mask", "conv_mask"):
        value = kwargs.get(name)
        masks.update({f"{name}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return masks


def _same(a, b) -> bool:
    return (a is None and b is None) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                         and a.shape == b.shape and torch.equal(a, b))


def test_zaya_on_a_static_cache_stays_eager_naming_its_masks():
    """generate() hands a static cache's stack the masks of Zaya's own create_masks_for_generate, keyed by its layer
    types: not masks bcg can hand the breaks, so those calls run eagerly, warned once, with eager's tokens."""
    reference, model = _pair("zaya", **CONVOLVING_ATTENTION["zaya"])
    ids, mask = left_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                   cache_implementation="static", disable_compile=True)
    expected = reference.generate(ids, **options)
    handle = bcg.wrap_model(model, backend="eager")
    with pytest.warns(bcg.BcgFallbackWarning, match=r"keyed \['conv', 'hybrid', 'hybrid_sliding'\] \(the model's own"):
        assert torch.equal(model.generate(ids, **options), expected)
    assert handle.stats()["replays"] == 0 and set(handle.stats()["rejects"]) == {"unsupported_mask"}


def test_a_looped_inkling_2_stays_eager_naming_why():
    """Inkling 2's looped stack applies its loop layers several times per forward, each pass on cache slots of its
    own: a warned fallback with eager's tokens."""
    fields = dict(num_hidden_layers=4, layer_types=["hybrid_sliding", "hybrid"] * 2, n_layers_per_attn_res_block=2,
                  loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=2)
    reference, model = _pair("inkling2_loop_text", **fields)
    ids, mask = left_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **options)
    handle = bcg.wrap_model(model, backend="eager")
    with pytest.warns(bcg.BcgFallbackWarning, match="applied several times per forward"):
        assert torch.equal(model.generate(ids, **options), expected)
    assert handle.stats()["replays"] == 0

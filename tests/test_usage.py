"""How users call a wrapped model: generate() variants, plain forwards, embeddings; each compared with eager."""

import warnings

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache

import bcg
import internals
from tiny_models import VOCAB, left_padded_batch, tiny_model


@pytest.fixture
def pair():
    """An eager reference model and an identical wrapped one (eager backend)."""
    reference = tiny_model("qwen3")
    wrapped = tiny_model("qwen3")
    handle = bcg.wrap_model(wrapped, backend="eager")
    return reference, wrapped, handle


def _generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs)


def test_generate_static_cache_matches_and_is_not_compiled(pair, monkeypatch):
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch()
    expected = _generate(reference, ids, mask, do_sample=False, cache_implementation="static")
    # A compile config that compiles on any device: generate() would compile the forward were bcg not preventing it.
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    monkeypatch.setattr(wrapped, "get_compiled_call", lambda *a: pytest.fail("generate() compiled a wrapped model"))
    got = _generate(wrapped, ids, mask, do_sample=False, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(got, expected)
    assert handle.stats()["replays"] == 6
    assert handle.stats()["rejects"] == {}
    assert wrapped.generation_config.disable_compile in (None, False)  # bcg writes nothing save_pretrained could save


def test_sampling_with_seed_matches(pair):
    reference, wrapped, _ = pair
    ids, mask = left_padded_batch()
    torch.manual_seed(7)
    expected = _generate(reference, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    got = _generate(wrapped, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(got, expected)


def test_num_return_sequences(pair):
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch(batch=2, pads=(2, 0))
    torch.manual_seed(3)
    expected = _generate(reference, ids, mask, do_sample=True, num_return_sequences=3)
    torch.manual_seed(3)
    got = _generate(wrapped, ids, mask, do_sample=True, num_return_sequences=3)
    assert got.shape[0] == 6
    assert torch.equal(got, expected)
    assert handle.stats()["rejects"] == {}


def test_forward_without_mask_and_right_padded_like_lm_eval(pair):
    reference, wrapped, handle = pair
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    ids[0, -3:] = 0  # right padding, no mask: lm-eval's loglikelihood call
    with torch.no_grad():
        expected = reference(ids).logits
        got = wrapped(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 1


def test_forward_with_explicit_positions_and_cache_continuation(pair):
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch()
    outputs = []
    for model in (reference, wrapped):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, 5:]
            second = model(ids[:, 5:], attention_mask=mask, past_key_values=cache, position_ids=positions)
        outputs.append((first.logits, second.logits))
    real = mask.bool()
    torch.testing.assert_close(outputs[1][0][real[:, :5]], outputs[0][0][real[:, :5]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[1][1][real[:, 5:]], outputs[0][1][real[:, 5:]], atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 2


def test_user_static_cache(pair):
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch()
    results = []
    for model in (reference, wrapped):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            results.append(model(ids, attention_mask=mask, past_key_values=cache).logits)
    torch.testing.assert_close(results[1][mask.bool()], results[0][mask.bool()], atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 1


def test_inputs_embeds(pair):
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch()
    embeds = reference.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=mask).logits
        got = wrapped(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 1
    assert handle.stats()["captured_graphs"] == ["embeds/fast:24"]  # 19 real tokens of 27, packed (fast graphs)


def test_returned_hidden_state_does_not_alias_static_buffers(pair):
    _, wrapped, _ = pair
    ids, mask = left_padded_batch()
    with torch.no_grad():
        first = wrapped.model(ids, attention_mask=mask).last_hidden_state
        kept = first.clone()
        wrapped.model(torch.randint(3, VOCAB, ids.shape), attention_mask=mask)
    assert torch.equal(first, kept)


def test_padded_bucket_tail_holds_zeros_not_stale_rows(pair):
    """Rows past N in the output bridge are zeroed once per call, whatever an earlier call left there."""
    reference, wrapped, handle = pair
    ids, mask = left_padded_batch(batch=3, seq=9)  # 19 real tokens of 27, packed -> bucket 24
    with torch.no_grad():
        wrapped(ids, attention_mask=mask)  # captures: the bridges exist from here on
    for buffer in internals.bridges(handle).values():
        buffer.fill_(float("nan"))
    with torch.no_grad():
        got = wrapped(ids, attention_mask=mask).logits
        want = reference(ids, attention_mask=mask).logits
    outputs = [b for (role, *_), b in internals.bridges(handle).items() if role == "out"]
    assert outputs and all(torch.count_nonzero(b[19:24]) == 0 for b in outputs)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-4)

@pytest.mark.parametrize(
    "call, reason",
    [
        (lambda m, ids, mask: m(ids, attention_mask=mask, output_hidden_states=True), "output_hidden_states"),
        (lambda m, ids, mask: m(ids, attention_mask=mask, output_attentions=True), "output_attentions"),
        (lambda m, ids, mask: m(ids.repeat(1, 40), use_cache=False), "too_many_tokens"),
    ],
)
def test_rejected_calls_count_their_reason_and_match_eager(call, reason):
    reference = tiny_model("llama", attn_implementation="eager")
    wrapped = tiny_model("llama", attn_implementation="eager")
    handle = bcg.wrap_model(wrapped, backend="eager", max_num_tokens=64)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = call(reference, ids, mask).logits
        got = call(wrapped, ids, mask).logits
    assert torch.equal(got, expected)
    assert handle.stats()["rejects"] == {reason: 1}
    assert handle.stats()["replays"] == 0


@pytest.mark.parametrize("flag, field",
                         [("output_hidden_states", "hidden_states"), ("output_attentions", "attentions")])
def test_an_output_flag_set_on_the_config_after_wrapping_runs_eagerly(flag, field):
    reference = tiny_model("llama", attn_implementation="eager")
    wrapped = tiny_model("llama", attn_implementation="eager")
    handle = bcg.wrap_model(wrapped, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        wrapped(ids, attention_mask=mask)
        for model in (reference, wrapped):
            setattr(model.config, flag, True)
        got, want = wrapped(ids, attention_mask=mask), reference(ids, attention_mask=mask)
    assert handle.stats()["rejects"] == {flag: 1} and handle.stats()["replays"] == 1
    assert torch.equal(got.logits, want.logits)
    assert len(getattr(got, field)) == len(getattr(want, field)) > 0


def test_training_and_grad_run_eagerly_with_working_autograd():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    model.train()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.eval()
    model(ids, attention_mask=mask)  # grad enabled, trainable weights
    assert handle.stats()["rejects"] == {"training": 1, "grad_enabled": 1}
    assert handle.stats()["replays"] == 0


def test_calls_over_the_largest_capture_size_warn_once_naming_the_option():
    reference, wrapped = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(wrapped, backend="eager", max_num_tokens=64)
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [wrapped(ids.repeat(1, n), use_cache=False).logits for n in (8, 9, 8)]  # 216, 243, 216 tokens
    fallback = [str(w.message) for w in caught if issubclass(w.category, bcg.BcgFallbackWarning)]
    assert len(fallback) == 1 and "max_num_tokens" in fallback[0] and "more than 64 tokens" in fallback[0]
    with torch.no_grad():
        assert torch.equal(got[1], reference(ids.repeat(1, 9), use_cache=False).logits)
    assert handle.stats()["rejects"] == {"too_many_tokens": 3}

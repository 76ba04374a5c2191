"""Self-verification: outside the verified transformers range (simulated by lying about the version) or with
``verify=True``, the first call of each kind is checked against eager, and simulated upstream changes of each kind
that broke bcg so far are caught: their calls then run eagerly, with a warning, and give eager's answers."""

import functools
import sys
import types
import warnings

import pytest
import torch

import bcg
from bcg import hf
from tiny_models import left_padded_batch, tiny_model

GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
NEWER = "5.99.0"


@pytest.fixture
def newer_transformers(monkeypatch):
    """A transformers release newer than the verified range: the installed one, lying about its version."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", NEWER)


def _wrap(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = bcg.wrap_model(model, backend="eager", **options)
    return handle, [w for w in caught if issubclass(w.category, bcg.BcgVersionWarning)]


def _two_turns(model, ids, mask):
    """generate(), then a second turn continuing the returned cache with three new tokens (a multi-token call on a
    past), as a chat does."""
    first = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **GENERATE)
    cache = first[hf.cache_argument(model.forward)] if hf.cache_argument(model.forward) in first else \
        first.past_key_values
    turn = torch.cat([first.sequences, ids[:, -3:]], dim=1)
    turn_mask = torch.cat([mask, torch.ones(ids.shape[0], turn.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    second = model.generate(turn, attention_mask=turn_mask, past_key_values=cache, **GENERATE)
    return first.sequences, second


def test_a_newer_transformers_warns_naming_both_versions_and_checks_each_kind(newer_transformers):
    reference, model = tiny_model("qwen3_5_text"), tiny_model("qwen3_5_text")
    ids, mask = left_padded_batch()
    handle, version_warnings = _wrap(model)
    assert len(version_warnings) == 1
    assert NEWER in str(version_warnings[0].message) and hf.VERIFIED_TRANSFORMERS[1] in str(version_warnings[0].message)
    got = _two_turns(model, ids, mask)
    expected = _two_turns(reference, ids, mask)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    verified = handle.stats()["verify"]
    assert verified["on"] and verified["failed"] == {}
    phases = {kind.split(" / ")[0] for kind in verified["checked"]}
    assert phases == {"prompt", "decode", "continuation"}, verified
    assert handle.stats()["replays"] > len(verified["checked"])  # later calls of a checked kind replay unchecked


def test_verify_false_turns_it_off_with_a_warning_that_says_so(newer_transformers):
    handle, version_warnings = _wrap(tiny_model("llama"), verify=False)
    assert len(version_warnings) == 1 and "not checked" in str(version_warnings[0].message)
    assert handle.stats()["verify"] == {"on": False}


def test_inside_the_range_nothing_is_checked_unless_asked():
    handle, version_warnings = _wrap(tiny_model("llama"))
    assert version_warnings == [] and handle.stats()["verify"] == {"on": False}
    assert handle.stats()["transformers"] == {"installed": hf.installed_transformers(),
                                              "verified": list(hf.VERIFIED_TRANSFORMERS)}
    handle, _ = _wrap(tiny_model("llama"), verify=True)
    assert handle.stats()["verify"]["on"]
    with pytest.raises(ValueError, match="verify must be"):
        bcg.wrap_model(tiny_model("llama"), backend="eager", verify="yes")


# ----- simulated upstream changes, each of a kind that broke bcg so far -----
def _positions_renamed(monkeypatch, model) -> None:
    """A release renames the stack's ``position_ids`` to ``cache_position`` (an argument bcg takes for one that
    changes nothing): bcg keeps deriving positions from the past."""
    stack_class = type(model.model)
    original = stack_class.forward

    @functools.wraps(original)
    def forward(self, *args, cache_position=None, **kwargs):
        if cache_position is not None:
            kwargs["position_ids"] = cache_position.unsqueeze(0)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(stack_class, "forward", forward)


def _mixer_counts_steps_elsewhere(monkeypatch, model) -> None:
    """A release's mixer keeps a step counter of a new kind (on the cache object, advanced in place) and reads it:
    what 5.25's conv-state counter did to bcg's decode graphs."""
    mixer_class = type(model.model.layers[0].linear_attn)
    original = mixer_class.forward

    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        names = ("cache", "cache_params", "past_key_values")  # where a mixer takes its cache, 5.17 to 5.25
        cache = next((v for k, v in kwargs.items() if k in names and v is not None), None)
        output = original(self, hidden_states, *args, **kwargs)
        if cache is None:
            return output
        steps = cache.__dict__.setdefault("steps", {}).setdefault(
            self.layer_idx, torch.zeros((), dtype=torch.long, device=hidden_states.device))
        steps.add_(hidden_states.shape[1])
        return output + steps.to(output.dtype) * 1e-2

    monkeypatch.setattr(mixer_class, "forward", forward)


def _attention_function_replaced(monkeypatch, model) -> None:
    """A release's attention modules call another function than the one bcg looks up for their implementation (here:
    the modeling file's ``eager_attention_forward`` becomes a variant the model no longer calls)."""
    attention_class = type(model.model.layers[0].self_attn)
    modeling = sys.modules[attention_class.__module__]
    used = modeling.eager_attention_forward
    function = inspect_unwrapped(attention_class.forward)
    forward = types.FunctionType(function.__code__, {**function.__globals__, "eager_attention_forward": used},
                                 function.__name__, function.__defaults__, function.__closure__)
    forward.__kwdefaults__ = function.__kwdefaults__

    def variant(module, query, key, value, attention_mask, scaling, **kwargs):
        return used(module, query, key, value, attention_mask, scaling * 2, **kwargs)

    monkeypatch.setattr(attention_class, "forward", forward)
    monkeypatch.setattr(modeling, "eager_attention_forward", variant)


def inspect_unwrapped(function):
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def _calls(model, ids, mask):
    """A prompt with explicit positions (offset by 2, as a caller continuing a document does), then two decode steps
    by plain forward calls, each with the 2D mask generate() would pass; the logits of every call."""
    name = hf.cache_argument(model.forward)
    logits, cache = [], None
    with torch.no_grad():
        positions = torch.arange(ids.shape[1]) + 2
        out = model(input_ids=ids, attention_mask=mask, cache_position=positions, use_cache=True)
        logits.append(out.logits)
        cache = out[name] if name in out else out.past_key_values
        for _ in range(2):
            tokens = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            out = model(input_ids=tokens, attention_mask=mask, use_cache=True, **{name: cache})
            logits.append(out.logits)
    return logits


@pytest.mark.parametrize("arch, change, failing_phase", [
    ("llama", _positions_renamed, "prompt"),
    ("qwen3_5_text", _mixer_counts_steps_elsewhere, "decode"),
    ("llama", _attention_function_replaced, "prompt"),
])
def test_a_simulated_upstream_change_is_caught_and_its_calls_run_eagerly(monkeypatch, newer_transformers, arch,
                                                                          change, failing_phase):
    overrides = {"attn_implementation": "eager"} if change is _attention_function_replaced else {}
    reference, model, unchecked = (tiny_model(arch, **overrides) for _ in range(3))
    change(monkeypatch, reference)
    ids, mask = left_padded_batch()
    expected = _calls(reference, ids, mask)

    handle, _ = _wrap(model)
    with pytest.warns(bcg.BcgFallbackWarning, match=f"'s {failing_phase} / .* calls differ from eager by"):
        got = _calls(model, ids, mask)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    failed = handle.stats()["verify"]["failed"]
    assert [kind.split(" / ")[0] for kind in failed] == [failing_phase], failed

    # The change does bite: unchecked, bcg's answers would differ from eager's.
    unchecked_handle, _ = _wrap(unchecked, verify=False)
    wrong = _calls(unchecked, ids, mask)
    assert any(not torch.allclose(g, e, atol=1e-3, rtol=1e-3) for g, e in zip(wrong, expected))

"""transformers compatibility: the cache under either argument name, and fallbacks that say so (never silent)."""

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, Cache, DynamicCache, QuantizedCache

import bcg
from bcg import hf
import internals
from tiny_models import left_padded_batch, tiny_model


def _fallback_warnings(caught):
    return [w for w in caught if issubclass(w.category, bcg.BcgFallbackWarning)]


def test_the_stack_takes_the_cache_under_the_installed_name():
    model = tiny_model("llama")
    name = hf.cache_argument(model.model.forward)
    assert name in hf.CACHE_ARGUMENTS
    handle = bcg.wrap_model(model, backend="eager")
    assert internals.cache_argument(handle) == name


@pytest.mark.parametrize("name", hf.CACHE_ARGUMENTS)
def test_stack_call_with_either_cache_name_replays_and_fills_the_cache(name):
    """5.24 renamed past_key_values to cache and still accepts the old name (deprecated): both must replay."""
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    if name not in hf.forward_parameters(model.model.forward) and name != "past_key_values":
        pytest.skip(f"this transformers' stack does not take {name!r}")
    ids, mask = left_padded_batch()
    handle = bcg.wrap_model(model, backend="eager")
    caches = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated name, on versions that renamed it
        for m in (reference, model):
            cache = DynamicCache(config=m.config)
            out = m.model(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache})
            caches.append((out.last_hidden_state, cache))
    (expected, expected_cache), (got, got_cache) = caches
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert got_cache.get_seq_length() == expected_cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(got_cache.layers[1].keys, expected_cache.layers[1].keys)
    assert handle.stats()["replays"] == 1 and handle.stats()["rejects"] == {}


def test_returned_output_carries_the_live_cache():
    model = tiny_model("llama")
    name = hf.cache_argument(model.model.forward)
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache})
    assert out[1] is cache  # the output's cache field, whatever this transformers names it


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gpt2", "qwen3_5_text"])
def test_stack_outputs_are_what_their_constructor_makes(arch):
    """bcg fills a stack's output in directly (transformers' constructor costs 20-30 µs a decode step): the same class,
    items and attributes as the constructor gives, on the installed transformers."""
    model = tiny_model(arch)
    handle = bcg.wrap_model(model, backend="eager")
    with torch.no_grad():
        model(left_padded_batch()[0])
    output_cls, hidden, cache = handle.runner.segments.output_cls, torch.zeros(1, 1, 8), DynamicCache()
    made = hf.output_with_cache(output_cls, hidden, cache)
    constructed = output_cls(last_hidden_state=hidden, **{hf.caches._cache_field(output_cls): cache})
    assert type(made) is output_cls and list(made.items()) == list(constructed.items())
    assert vars(made).keys() == vars(constructed).keys()
    assert made.to_tuple() == constructed.to_tuple() and hf.cache_of(made) is cache


def test_an_output_class_whose_constructor_does_more_is_constructed():
    """Where filling an output in would miss what its constructor does, bcg calls the constructor."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import BaseModelOutputWithPast

    @dataclass
    class Marked(BaseModelOutputWithPast):
        def __post_init__(self):
            super().__post_init__()
            object.__setattr__(self, "marked", True)

    output = hf.output_with_cache(Marked, torch.zeros(1), DynamicCache())
    assert output.marked and hf.caches._output_maker(Marked).__name__ == "construct"


def test_an_unknown_stack_argument_warns_once_naming_it():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    original = internals.stack_forward(handle)
    internals.replace_stack_forward(handle, lambda *a, surprise=None, **k: original(*a, **k))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            got = model.model(input_ids=ids, attention_mask=mask, surprise=torch.ones(1))
    fallback = _fallback_warnings(caught)
    assert len(fallback) == 1
    assert "surprise" in str(fallback[0].message) and "unsupported_argument" in str(fallback[0].message)
    assert handle.stats()["rejects"] == {"unsupported_argument": 3}
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state[mask.bool()], expected.last_hidden_state[mask.bool()])


def test_an_unsupported_cache_class_warns_once_naming_it():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, _ = left_padded_batch(pads=(0, 0, 0))

    class MyCache(DynamicCache):
        pass

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            model(ids, use_cache=True, **{hf.cache_argument(model.forward): MyCache(config=model.config)})
    fallback = _fallback_warnings(caught)
    assert len(fallback) == 1 and "MyCache" in str(fallback[0].message)
    assert handle.stats()["rejects"] == {"unsupported_cache": 2}
    assert QuantizedCache.__name__ in (hf.unsupported_cache_reason(object.__new__(QuantizedCache)) or "")


def test_a_stack_forward_without_the_arguments_bcg_needs_stays_eager_with_a_warning(monkeypatch):
    model = tiny_model("llama")
    original = model.model.forward
    monkeypatch.setattr(model.model, "forward",
                        lambda input_ids=None, attention_mask=None: original(input_ids, attention_mask))
    with pytest.warns(bcg.BcgFallbackWarning, match="does not take"):
        handle = bcg.wrap_model(model, backend="eager")
    assert handle.stats()["ready"] is False


def test_plain_calls_with_grad_enabled_warn_once_saying_how_to_replay():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    fallback = _fallback_warnings(caught)
    assert len(fallback) == 1 and "no_grad" in str(fallback[0].message)
    assert handle.stats()["rejects"] == {"grad_enabled": 2}


@pytest.mark.parametrize("sizes", [np.array([4, 16]), [np.int64(4), torch.tensor(16).item()], (np.int32(4), 16)])
def test_capture_sizes_accept_integral_types(sizes):
    handle = bcg.wrap_model(tiny_model("llama"), capture_sizes=sizes, max_num_tokens=np.int64(16), backend="eager")
    assert internals.sizes(handle) == [4, 16] and all(type(s) is int for s in internals.sizes(handle))


@pytest.mark.parametrize("arch", ["gemma4_text", "gemma3n_text"])
def test_kv_sharing_layers_read_the_stored_keys_with_a_static_cache(arch):
    reference, model = tiny_model(arch), tiny_model(arch)
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  cache_implementation="static", return_dict_in_generate=True)
    expected, got = reference.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert handle.stats()["replays"] == 5 and handle.stats()["rejects"] == {}
    expected_cache, got_cache = (getattr(o, hf.CACHE_ARGUMENTS[0], None) or o.past_key_values for o in (expected, got))
    for layer in (2, 3):  # the layers whose keys/values the shared layers read
        torch.testing.assert_close(got_cache.layers[layer].keys, expected_cache.layers[layer].keys)


def test_a_mask_that_transformers_cannot_build_runs_eagerly_with_one_warning(monkeypatch):
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()

    def broken(*args, **kwargs):
        raise TypeError("create_chunked_causal_mask() got an unexpected keyword argument")

    monkeypatch.setattr(hf, "create_masks", broken)  # transformers' mask utilities, as bcg calls them
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [model(ids, attention_mask=mask).logits for _ in range(2)]
        expected = reference(ids, attention_mask=mask).logits
    fallback = _fallback_warnings(caught)
    assert len(fallback) == 1 and "create_chunked_causal_mask" in str(fallback[0].message)
    assert handle.stats()["rejects"] == {"mask_failed": 2}
    assert torch.equal(got[1], expected)


class _OwnCache(DynamicCache):
    """A model's own cache class (as MiniMax has), for the annotation tests below."""


def test_the_cache_class_a_stack_makes_is_read_from_its_annotation():
    def annotated(input_ids=None, cache: _OwnCache | None = None):
        return None

    def postponed(input_ids=None, past_key_values: "_OwnCache | None" = None):
        return None

    def unresolvable(input_ids=None, cache: "NoSuchCache | None" = None):  # noqa: F821
        return None

    def plain(input_ids=None, cache: Cache | None = None):
        return None

    assert hf.stack_cache_class(annotated) is _OwnCache
    assert hf.stack_cache_class(postponed) is _OwnCache
    assert hf.stack_cache_class(unresolvable) is DynamicCache
    assert hf.stack_cache_class(plain) is DynamicCache
    assert type(hf.new_cache(_OwnCache, None)) is _OwnCache


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_the_verified_range_is_stated_once_and_pyproject_and_readme_agree():
    """hf.VERIFIED_TRANSFORMERS is the one source: pyproject pins transformers to it and the README states it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    oldest, newest = hf.VERIFIED_TRANSFORMERS
    pin = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', (root / "pyproject.toml").read_text())
    assert pin is not None, "pyproject.toml must pin transformers as >=OLDEST,<NEXT_MINOR"
    assert _minor(pin.group(1)) == _minor(oldest)
    next_minor = (_minor(newest)[0], _minor(newest)[1] + 1)
    assert _minor(pin.group(2)) == next_minor
    readme = (root / "README.md").read_text()
    stated = re.findall(r"verified on transformers ([\d.]+) to ([\d.]+)", readme)
    assert stated == [(oldest, newest)], stated  # once, and the constant's
    assert not hf.outside_verified_range(oldest) and not hf.outside_verified_range(newest)
    assert hf.outside_verified_range(f"{next_minor[0]}.{next_minor[1]}.0")


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2"])
def test_config_readers_read_what_getattr_reads_as_the_config_changes(model_type):
    """The per-call readers (hf.attribute_reader) skip the config's own lookup only where it reads the same: plain
    attributes, class defaults, properties returning one attribute; aliases (gpt2's hidden_size) go through it."""
    config = AutoConfig.for_model(model_type)
    names = ["output_attentions", "output_hidden_states", "output_router_logits", "_attn_implementation", "use_cache",
             "hidden_size"]
    readers = {name: hf.attribute_reader(config, name, "absent") for name in names}

    def read_both() -> tuple[dict, dict]:
        return {n: r() for n, r in readers.items()}, {n: getattr(config, n, "absent") for n in names}

    before, want = read_both()
    assert before == want
    config.output_attentions = config.output_hidden_states = config.output_router_logits = True
    config._attn_implementation = "eager"
    config.use_cache = False
    config.hidden_size = 24
    after, want = read_both()
    assert after == want and after != before

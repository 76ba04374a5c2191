"""The public API: options and their errors, backend choice, wrap/unwrap lifecycle, models that stay eager."""

import functools
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import bcg
from bcg import hf
import internals
from tiny_models import left_padded_batch, tiny_model


@pytest.mark.parametrize("sizes", [[0, 4], [1.5], ["8"], [], "16", [True]])
def test_bad_capture_sizes_raise_value_error_naming_the_fix(sizes):
    with pytest.raises(ValueError, match="capture_sizes"):
        bcg.wrap_model(tiny_model("llama"), capture_sizes=sizes, backend="eager")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_num_tokens=0), "max_num_tokens"),
    (dict(capture_sizes=[4, 128], max_num_tokens=64), "exceed max_num_tokens"),
    (dict(backend="tpu"), "backend"),
    (dict(debug="verbose", backend="eager"), "debug"),
    (dict(attention_kernels="cudnn", backend="eager"), "attention_kernels"),
    (dict(mode="turbo", backend="eager"), "mode must be one of"),
    (dict(lazy="no", backend="eager"), "lazy"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bcg.wrap_model(tiny_model("llama"), **kwargs)


def test_cuda_backend_on_cpu_model_says_how_to_debug():
    with pytest.raises(ValueError, match="backend='eager'"):
        bcg.wrap_model(tiny_model("llama"), backend="cuda")


def test_default_backend_on_cpu_is_eager_with_a_warning():
    with pytest.warns(bcg.BcgFallbackWarning, match="backend='eager'"):
        handle = bcg.wrap_model(tiny_model("llama"))
    assert handle.stats()["backend"] == "eager"


def test_not_a_causal_lm_raises_type_error():
    with pytest.raises(TypeError, match="ForCausalLM"):
        bcg.wrap_model(torch.nn.Linear(2, 2))
    config = AutoConfig.for_model("t5", vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    with pytest.raises(TypeError, match="decoder-only"):
        bcg.wrap_model(AutoModelForSeq2SeqLM.from_config(config))


def test_custom_sizes_are_used_and_lazy_false_captures_largest_first():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, capture_sizes=[16, 4, 64, 4], max_num_tokens=64, backend="eager", lazy=False)
    stats = handle.stats()
    assert stats["captured"] == [4, 16, 64]
    # mode="fast" (the default): each size's decode-step graph too, so generate() captures nothing later
    expected = [(kind, size) for size in (64, 16, 4) for kind in ("ids", "ids/fast")]
    assert list(internals.breakable_graphs(model._bcg_handle)) == expected
    exact = bcg.wrap_model(tiny_model("llama"), capture_sizes=[4, 16], max_num_tokens=16, backend="eager", lazy=False,
                           mode="exact")
    assert list(internals.breakable_graphs(exact)) == [("ids", 16), ("ids", 4)]


def test_wrap_twice_returns_same_handle_and_unwrap_twice_warns():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    with pytest.warns(bcg.BcgWarning, match="already wrapped"):
        assert bcg.wrap_model(model, backend="eager") is handle
    bcg.unwrap_model(model)
    assert "forward" not in model.model.__dict__
    with pytest.warns(bcg.BcgWarning, match="not wrapped"):
        bcg.unwrap_model(model)


def test_unwrap_restores_generation_config_and_attention():
    model = tiny_model("llama")
    before = (model.generation_config.disable_compile, model.config._attn_implementation)
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    bcg.unwrap_model(model)
    assert (model.generation_config.disable_compile, model.config._attn_implementation) == before


def test_stats_have_the_documented_keys():
    stats = bcg.wrap_model(tiny_model("llama"), backend="eager").stats()
    documented = {"replays", "full_graph_replays", "rejects", "captured", "captured_graphs", "capture_seconds",
                  "full_graphs", "graph_bytes", "bridge_bytes", "capture_failures", "invalidations", "numerics",
                  "fused_kernels", "mode", "attention_kernels", "backend", "ready", "disabled_reason",
                  "static_cache", "static_cache_bytes", "transformers", "verify"}
    assert set(stats) == documented
    assert isinstance(stats["replays"], int) and isinstance(stats["rejects"], dict)


def _falcon():
    config = AutoConfig.for_model("falcon", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, new_decoder_architecture=False, multi_query=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _bloom_attention_without_the_cache():
    """Bloom whose blocks hand their attention (outside the AttentionInterface) no cache: no module bcg could run as a
    break of its own uses one, and the attention would be captured with the capture's mask."""
    config = AutoConfig.for_model("bloom", vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for block in model.transformer.h:
        block.forward = functools.partial(_without_cache, block.forward)
    return model


def _without_cache(forward, *args, **kwargs):
    return forward(*args, **{**kwargs, "layer_past": None})


def _wrapped_and_called(model, ids, mask, calls: int = 1):
    """Wrap (eager backend) and call ``calls`` times, every warning recorded: the handle, the first logits, the
    warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = bcg.wrap_model(model, backend="eager")
        with torch.no_grad():
            logits = [model(ids, attention_mask=mask).logits for _ in range(calls)]
    return handle, logits[0], caught


def test_falcon_replays_whether_its_attention_goes_through_the_interface_or_not():
    """transformers 5.25 moved Falcon's attention onto the AttentionInterface: there attention breaks serve it; before,
    its attention module is a break of its own. Either way it replays with eager's logits, without a warning."""
    reference, model = _falcon(), _falcon()
    ids, mask = left_padded_batch()
    handle, got, caught = _wrapped_and_called(model, ids, mask)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    assert [w for w in caught if issubclass(w.category, bcg.BcgFallbackWarning)] == []
    assert handle.stats()["replays"] == 1
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    module_breaks = [s for s in internals.slots(handle, "ids/fast") if getattr(s, "attends", False)]
    assert len(module_breaks) == (0 if hf.uses_attention_interface(model) else 2)


def _dynamic_rope_llama():
    return tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})


def _from_config(model_type, **kwargs):
    def build():
        try:
            config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, **kwargs)
        except ValueError:
            pytest.skip(f"this transformers has no {model_type}")
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()
    return build


# Two stacks cycled over (a layer list shorter than num_hidden_layers) and a stack that loops over its middle layers.
_CYCLED_STACKS = _from_config("hrm_text", num_hidden_layers=2, head_dim=16, H_cycles=2, L_cycles=2)
_LOOPED_LAYERS = _from_config("dory", num_hidden_layers=6, n_input_layers=2, n_output_layers=2, n_recurrent_loops=2,
                              num_key_value_heads=2, head_dim=16, sliding_window=4)


@pytest.mark.parametrize("build, match", [
    (_bloom_attention_without_the_cache, "AttentionInterface"), (_dynamic_rope_llama, "dynamic RoPE"),
    (_CYCLED_STACKS, "no layer stack"), (_LOOPED_LAYERS, "several times per forward"),
])
def test_unsupported_models_warn_once_and_stay_correct(build, match):
    reference, model = build(), build()
    ids, mask = left_padded_batch()
    handle, got, caught = _wrapped_and_called(model, ids, mask, calls=2)
    fallback = [w for w in caught if issubclass(w.category, bcg.BcgFallbackWarning)]
    assert len(fallback) == 1 and match in str(fallback[0].message)
    with torch.no_grad():
        assert torch.equal(got, reference(ids, attention_mask=mask).logits)
    assert handle.stats()["ready"] is False and handle.stats()["replays"] == 0
    bcg.unwrap_model(model)


def _tiny_gemma3_multimodal():
    from transformers import AutoModelForImageTextToText

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                  image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def test_multimodal_model_wraps_its_language_model():
    reference, model = _tiny_gemma3_multimodal(), _tiny_gemma3_multimodal()
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **kwargs)
    handle = bcg.wrap_model(model, backend="eager")
    assert internals.stack_path(handle) == "model.language_model"
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert handle.stats()["replays"] == 6 and handle.stats()["rejects"] == {}


def test_stack_found_by_scanning_warns_and_names_it(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "get_decoder", lambda self: self)
    with pytest.warns(bcg.BcgResolveWarning, match="using 'model'"):
        handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert handle.stats()["replays"] == 1


@pytest.mark.parametrize("device_map, match", [
    ({"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}, "offloads"),
    ({"model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}, "split across devices"),
])
def test_offloaded_or_split_models_stay_eager(device_map, match):
    model = tiny_model("llama")
    model.hf_device_map = device_map
    with pytest.warns(bcg.BcgFallbackWarning, match=match):
        handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert handle.stats()["ready"] is False and handle.stats()["replays"] == 0


def test_accelerate_device_hooks_on_one_device_replay_and_match_eager():
    """A model dispatched by accelerate onto one device carries its hooks (each layer's inputs sent to the layer's
    device): bcg replays through them with eager's tokens."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    reference, model = tiny_model("llama"), tiny_model("llama")
    for layer in model.model.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
    add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    expected = reference.generate(ids, **kwargs)
    handle = bcg.wrap_model(model, backend="eager")
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert handle.stats()["replays"] == 5 and handle.stats()["rejects"] == {}


def test_meta_weights_stay_eager():
    config = tiny_model("llama").config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.warns(bcg.BcgFallbackWarning, match="meta"):
        handle = bcg.wrap_model(model, backend="eager")
    assert handle.stats()["ready"] is False


@pytest.mark.parametrize("mode, attention_kernels, fused_kernels, expected", [
    ("fast", None, None, ("fast", True)),
    ("exact", None, None, ("eager", False)),
    ("fast", None, False, ("fast", False)),
    ("fast", "eager", None, ("eager", True)),
    ("exact", "fast", True, ("fast", True)),
])
def test_mode_sets_attention_and_fusion_and_each_override_wins(monkeypatch, mode, attention_kernels, fused_kernels,
                                                               expected):
    monkeypatch.setattr(bcg.wrap, "unavailable_reason", lambda device: None)  # as on a GPU with triton
    choices = bcg.wrap.speed_choices(mode, attention_kernels, fused_kernels, torch.device("cuda"))
    assert (choices.attention_kernels, choices.fused_kernels) == expected


def test_fast_mode_without_triton_or_cuda_fuses_nothing_and_says_so_in_stats():
    handle = bcg.wrap_model(tiny_model("llama"), backend="eager")
    stats = handle.stats()
    assert (stats["mode"], stats["attention_kernels"], stats["fused_kernels"]) == ("fast", "fast", {})
    exact = bcg.wrap_model(tiny_model("llama"), backend="eager", mode="exact").stats()
    assert (exact["mode"], exact["attention_kernels"]) == ("exact", "eager")


@pytest.mark.parametrize("mode, fast_kind", [("fast", "ids/fast"), ("exact", "ids")])
def test_fast_mode_gives_decode_steps_and_padded_prompts_graphs_of_their_own(mode, fast_kind):
    """Log-likelihood calls (no padding mask) replay the plain graphs in either mode (their outputs stay eager's);
    under mode="fast" decode steps that take the breaks (here: static_cache=False) and padded prompts (whose attention
    runs per request anyway) replay graphs of their own, where the fast kernels live."""
    from bcg.buckets import pick_bucket
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    handle = bcg.wrap_model(model, backend="eager", mode=mode, static_cache=False)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        model(ids)
    sizes = internals.sizes(handle)
    assert torch.equal(tokens, expected)
    assert sorted(handle.stats()["captured_graphs"]) == sorted([
        f"{fast_kind}:{pick_bucket(sizes, int(mask.sum()))}",  # the padded prompt, packed
        f"{fast_kind}:{pick_bucket(sizes, ids.shape[0])}",  # decode steps
        f"ids:{pick_bucket(sizes, ids.numel())}",  # the mask-free call
    ])


@pytest.mark.parametrize("mode, static_cache, full_graphs", [
    ("fast", None, True), ("exact", None, False), ("fast", False, False), ("exact", True, True)])
def test_static_stand_ins_follow_the_mode_unless_asked(mode, static_cache, full_graphs):
    """mode="fast" decodes generate()'s dynamic cache through static stand-ins (one full graph per step), "exact" on the
    caller's cache through the breaks (eager's attention over the real length); ``static_cache`` overrides either."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    handle = bcg.wrap_model(model, backend="eager", mode=mode, static_cache=static_cache)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    stats = handle.stats()
    assert torch.equal(tokens, expected)
    assert stats["static_cache"] is full_graphs
    assert stats["full_graph_replays"] == (2 if full_graphs else 0)
    assert (stats["static_cache_bytes"] > 0) is full_graphs


def test_a_one_token_prompt_is_not_a_decode_step():
    """Without a cache a one-token call is a prompt: it replays the prompts' graphs (eager's kernels) in fast mode."""
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    with torch.no_grad():
        model(torch.tensor([[5], [6]]))
    assert [graph.split(":")[0] for graph in handle.stats()["captured_graphs"]] == ["ids"]


def test_unwrap_frees_what_was_made_for_the_graphs_and_keeps_the_stats():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    handle = bcg.wrap_model(model, backend="eager", static_cache=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    def held() -> list[int]:
        return [len(internals.stand_in_decoder(handle).bindings), len(internals.stand_ins(handle).bindings),
                len(internals.bridges(handle)), len(internals.breakable_graphs(handle)),
                len(internals.stand_in_decoder(handle).graphs)]

    assert all(held())
    replays = handle.stats()["replays"]
    bcg.unwrap_model(model)
    assert not any(held())
    assert handle.stats()["replays"] == replays

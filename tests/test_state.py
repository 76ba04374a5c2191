"""State a user changes after wrapping is honoured, tracked (invalidate + recapture) or refused: never a crash, never
a stale graph. Each test compares with an unwrapped twin under the same conditions."""

import copy
import io
import json
import pickle

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import bcg
from tiny_models import left_padded_batch, tiny_model


@pytest.fixture
def twins():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    return reference, model, handle


def _logits(model, ids, mask):
    return model(ids, attention_mask=mask).logits


def test_first_call_under_inference_mode_then_no_grad(twins):
    reference, model, handle = twins
    ids, mask = left_padded_batch()
    with torch.inference_mode():
        first = _logits(model, ids, mask)
    with torch.no_grad():
        second, expected = _logits(model, ids, mask), _logits(reference, ids, mask)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert handle.stats()["replays"] == 2 and handle.stats()["rejects"] == {}


def test_wrapped_under_inference_mode_then_used_outside_it():
    reference, model = tiny_model("llama"), tiny_model("llama")
    with torch.inference_mode():
        handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(_logits(model, ids, mask), _logits(reference, ids, mask))
    assert handle.stats()["replays"] == 1


def test_autocast_then_plain_calls_replay_their_own_graphs(twins):
    reference, model, handle = twins
    ids, mask = left_padded_batch()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast, expected_autocast = _logits(model, ids, mask), _logits(reference, ids, mask)
        plain, expected = _logits(model, ids, mask), _logits(reference, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = _logits(model, ids, mask)
    assert torch.equal(under_autocast, expected_autocast) and torch.equal(again, expected_autocast)
    assert torch.equal(plain, expected)
    stats = handle.stats()
    assert stats["replays"] == 3 and stats["rejects"] == {}
    assert stats["captured_graphs"] == ["ids/fast:24", "ids@autocast-bfloat16/fast:24"]  # 19 real tokens, packed


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_a_wrapped_model_is_a_working_unwrapped_model(twins, how):
    reference, model, handle = twins
    ids, mask = left_padded_batch()
    with torch.no_grad():
        _logits(model, ids, mask)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(_logits(clone, ids, mask), _logits(reference, ids, mask))
    assert handle.stats()["replays"] == 1  # the copy never ran the original's graphs
    assert clone.model.forward.__func__ is type(clone.model).forward  # its own forward, unwrapped
    clone_handle = bcg.wrap_model(clone, backend="eager")  # and it can be wrapped anew
    with torch.no_grad():
        _logits(clone, ids, mask)
    assert clone_handle.stats()["replays"] == 1


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_writes_what_the_unwrapped_model_writes(merged, shard, tmp_path, monkeypatch):
    """``merged``: wrapped with fused kernels (as on a GPU with triton), the q/k/v and gate/up weights are row blocks
    of one tensor per group (projections.py) and the state dict hands them out as such; transformers clones tensors
    that share a storage in disjoint areas before safetensors writes them, so the files (sharded too) are the
    unwrapped model's, byte for byte."""
    if merged:
        monkeypatch.setattr(bcg.wrap, "unavailable_reason", lambda device: None)
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    assert handle.stats()["fused_kernels"].get("qkv_gemm", 0) == (model.config.num_hidden_layers if merged else 0)
    ids, mask = left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="static")
    options = {} if shard is None else {"max_shard_size": shard}
    reference.save_pretrained(tmp_path / "reference", **options)
    model.save_pretrained(tmp_path / "wrapped", **options)
    for name in ("config.json", "generation_config.json"):
        written = [json.loads((tmp_path / d / name).read_text()) for d in ("reference", "wrapped")]
        assert written[0] == written[1], name
    files = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "wrapped").iterdir())
    assert (len([name for name in files if name.endswith(".safetensors")]) > 1) == (shard is not None)
    for name in files:
        assert (tmp_path / "wrapped" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    q, k = (state[f"model.layers.0.self_attn.{name}.weight"] for name in ("q_proj", "k_proj"))
    assert (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()) == merged  # views, handed out as such


def _halved_sdpa(module, query, key, value, attention_mask, **kwargs):
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return output * 0.5, weights


def test_a_new_attention_implementation_after_capture_is_used(twins):
    reference, model, handle = twins
    AttentionInterface.register("halved_sdpa", _halved_sdpa)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        _logits(model, ids, mask)
        for m in (reference, model):
            m.set_attn_implementation("halved_sdpa")
        with pytest.warns(bcg.BcgInvalidatedWarning, match="attention implementation"):
            got = _logits(model, ids, mask)
        expected = _logits(reference, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    stats = handle.stats()
    assert stats["invalidations"] == 1 and stats["replays"] == 2 and stats["rejects"] == {}

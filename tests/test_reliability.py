"""Right or loud: moved weights, debug modes, threads, bad input, and randomized parity against eager."""

import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcg
from bcg import addresses
import internals
from tiny_models import VOCAB, left_padded_batch, tiny_model


def _logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kwargs).logits


def test_cast_after_capture_invalidates_and_recaptures():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    _logits(model, ids, mask)
    model.double()
    reference.double()
    with pytest.warns(bcg.BcgInvalidatedWarning, match="moved or changed dtype"):
        got = _logits(model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], _logits(reference, ids, mask)[mask.bool()])
    stats = handle.stats()
    assert stats["invalidations"] == 1 and stats["replays"] == 2 and stats["captured"] == [24]


def test_swapped_weights_are_seen():
    reference, model = tiny_model("llama"), tiny_model("llama")
    bcg.wrap_model(model, backend="eager")
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    _logits(model, ids)
    new_weights = {k: v.clone() * 1.5 for k, v in reference.state_dict().items()}
    reference.load_state_dict(new_weights, assign=True)
    model.load_state_dict({k: v.clone() for k, v in new_weights.items()}, assign=True)
    with pytest.warns(bcg.BcgInvalidatedWarning):
        torch.testing.assert_close(_logits(model, ids), _logits(reference, ids))


def test_a_reassigned_parameter_invalidates_without_debug():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    _logits(model, ids)
    for m in (reference, model):
        layer = m.model.layers[1].self_attn.q_proj
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    with pytest.warns(bcg.BcgInvalidatedWarning):
        torch.testing.assert_close(_logits(model, ids), _logits(reference, ids))
    assert handle.stats()["invalidations"] == 1
    _logits(model, ids)
    assert handle.stats()["invalidations"] == 1  # recaptured once, then steady


def test_the_always_on_address_check_reads_a_bounded_sample():
    model = tiny_model("llama", num_hidden_layers=40)
    handle = bcg.wrap_model(model, backend="eager")
    watch = internals.address_watch(handle)
    assert len(addresses.tensor_slots(model.model)) > 300 and len(watch.sample) <= 65
    model.double()  # a cast moves every tensor: the sample sees it
    assert watch.moved()


@pytest.mark.parametrize("written", ["another tensor", "None"])
def test_the_address_check_sees_a_tensor_written_into_a_modules_dict_directly(written):
    """torch's _apply may (and accelerate does) put a tensor in a module's _parameters without a registration hook."""
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    watch = internals.address_watch(handle)
    assert not watch.moved()
    store, name = watch.sample[0]
    store[name] = torch.nn.Parameter(store[name].detach().clone()) if written == "another tensor" else None
    assert watch.moved()


def test_debug_addresses_names_the_changed_parameter():
    model = tiny_model("llama")
    bcg.wrap_model(model, backend="eager", debug=True)
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    _logits(model, ids)
    layer = model.model.layers[1].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    with pytest.raises(bcg.BcgAddressError, match=r"layers\.1\.self_attn\.q_proj\.weight"):
        _logits(model, ids)


def test_debug_numerics_reports_the_difference_per_call():
    model = tiny_model("qwen3")
    handle = bcg.wrap_model(model, backend="eager", debug="numerics")
    ids, mask = left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    numerics = handle.stats()["numerics"]
    assert numerics["checks"] == 4 and numerics["max_diff"] < 1e-5


def test_threads_get_correct_answers():
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    inputs = [torch.randint(3, VOCAB, (1 + i % 3, 4 + i), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [_logits(reference, ids) for ids in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        results[i] = _logits(model, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        torch.testing.assert_close(results[i], expected[i], atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 8


def test_reentrant_call_runs_eagerly():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    internals.in_a_break(handle, True)  # as if a break called the model again
    try:
        _logits(model, ids)
    finally:
        internals.in_a_break(handle, False)
    assert handle.stats()["rejects"] == {"reentrant": 1}


def test_empty_batch_gives_the_eager_answer():
    """transformers itself rejects an empty batch; bcg must not hide that behind a replay."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="0 elements") as eager_error:
        _logits(reference, empty)
    with pytest.raises(RuntimeError, match="0 elements") as wrapped_error:
        _logits(model, empty)
    assert str(wrapped_error.value) == str(eager_error.value)
    assert handle.stats()["rejects"] == {"empty_input": 1}


def test_mismatched_embedding_dtype_gives_the_eager_error():
    model = tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    embeds = torch.randn(1, 4, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        _logits(model, None, inputs_embeds=embeds)
    assert handle.stats()["rejects"] == {"bad_input": 1}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 12),
    padding=st.sampled_from(["left", "right", "none"]),
    decode_steps=st.integers(0, 3),
    sizes=st.sampled_from([None, [8, 64], [1, 2, 4, 16, 48, 64], [64]]),
    seed=st.integers(0, 2**16),
)
def test_randomized_parity(batch, seq, padding, decode_steps, sizes, seed):
    reference, model = _PAIR
    bcg.unwrap_model(model)
    handle = bcg.wrap_model(model, backend="eager", capture_sizes=sizes, max_num_tokens=64)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    pads = (torch.randint(0, seq, (batch,), generator=generator) if padding != "none"
            else torch.zeros(batch, dtype=torch.long))
    for row, pad in enumerate(pads.tolist()):
        if padding == "left":
            ids[row, :pad], mask[row, :pad] = 0, 0
        elif padding == "right" and pad:
            ids[row, -pad:], mask[row, -pad:] = 0, 0
    real = mask.bool()
    torch.testing.assert_close(_logits(model, ids, mask)[real], _logits(reference, ids, mask)[real], atol=1e-4,
                               rtol=1e-4)
    if decode_steps and padding != "right":
        kwargs = dict(attention_mask=mask, max_new_tokens=decode_steps, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    rejects = handle.stats()["rejects"]
    assert set(rejects) <= {"padding_waste", "too_many_tokens"}


_PAIR = (tiny_model("gemma3_text"), tiny_model("gemma3_text"))
bcg.wrap_model(_PAIR[1], backend="eager")  # each example unwraps and wraps again with its own sizes


def test_out_of_memory_during_capture_leaves_the_eager_answer(monkeypatch):
    from bcg.backends import EagerBackend

    def fail(self, run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EagerBackend, "capture", fail)
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    with pytest.warns(bcg.BcgCaptureWarning, match="out of memory"):
        got = _logits(model, ids, mask)
    again = _logits(model, ids, mask)  # the failed bucket is not retried: no second warning, still eager
    assert torch.equal(got, _logits(reference, ids, mask)) and torch.equal(again, got)
    stats = handle.stats()
    assert stats["rejects"] == {"capture_failed": 2} and "out of memory" in stats["capture_failures"]["ids/fast:24"]
    assert stats["captured"] == [] and stats["ready"] is True


def test_failed_capture_releases_its_tensors_even_when_logs_are_kept(monkeypatch):
    """The failed run's activations must not outlive it (a kept log record once pinned them, and the next
    bucket's capture then ran out of memory too)."""
    import logging
    import weakref

    from bcg.backends import EagerBackend

    activations = []

    def fail(self, run):
        activation = torch.empty(1024)
        activations.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class KeepRecords(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    keeper = KeepRecords()
    logging.getLogger("bcg").addHandler(keeper)
    monkeypatch.setattr(EagerBackend, "capture", fail)
    try:
        model = tiny_model("llama")
        bcg.wrap_model(model, backend="eager")
        with pytest.warns(bcg.BcgCaptureWarning):
            _logits(model, *left_padded_batch())
    finally:
        logging.getLogger("bcg").removeHandler(keeper)
    assert any("Traceback" in r.getMessage() for r in keeper.records)  # the traceback is still logged, as text
    assert activations and activations[0]() is None


def test_an_attention_module_passing_a_tensor_of_its_own_per_call_is_a_break_of_its_own(monkeypatch):
    """A tensor an attention module hands its attention function per call (Inkling's position bias) would be frozen at
    its capture value in attention's break: the probe sees it, and the whole module runs as a break of its own."""
    import bcg.attention

    monkeypatch.setattr(bcg.attention, "_PER_CALL_KWARGS", bcg.attention._PER_CALL_KWARGS - {"position_ids"})
    reference, model = tiny_model("llama"), tiny_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        handle = bcg.wrap_model(model, backend="eager")
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 1 and handle.stats()["rejects"] == {}
    slots = internals.slots(handle, "ids/fast")
    assert [(type(s.module).__name__, s.attends) for s in slots] == [("LlamaAttention", True)] * 2


def test_a_model_that_changes_its_own_buffers_every_call_is_left_eager_after_three_calls():
    """CTRL's forward reassigns its position-encoding buffer on every call: each call would invalidate and recapture
    the graphs, so after three such calls in a row bcg steps aside, with a warning; outputs stay eager's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("ctrl", vocab_size=128, n_embd=64, n_layer=2, n_head=4, dff=128, n_positions=256)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 7))
    handle = bcg.wrap_model(model, backend="eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = [torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5) for _ in range(5)]
    assert all(same) and not handle.stats()["ready"]
    assert any("changed on 3 calls in a row" in str(w.message) for w in caught)
    assert handle.stats()["invalidations"] == 3


def test_a_capture_that_failed_under_one_experts_implementation_is_tried_under_another(monkeypatch):
    """generate() switches MoE experts from grouped_mm to batched_mm for its decode steps on a GPU; a capture that
    failed under one (fp32 grouped_mm copies from the host) must not keep the other's calls eager. Simulated on CPU: a
    backend that cannot capture under grouped_mm."""
    model = tiny_model("qwen3_moe")
    handle = bcg.wrap_model(model, backend="eager", static_cache=False)
    backend = internals.backend(handle)
    capture = backend.capture

    def capture_unless_grouped_mm(run, reset=None):
        if model.config._experts_implementation == "grouped_mm":
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        return capture(run, reset)

    monkeypatch.setattr(backend, "capture", capture_unless_grouped_mm)
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    with pytest.warns(bcg.BcgCaptureWarning), torch.no_grad():
        expected = model(ids).logits  # capture fails under grouped_mm: eager
    model.set_experts_implementation("batched_mm")
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert handle.stats()["replays"] == 1 and handle.stats()["rejects"] == {"capture_failed": 1}
    assert [key.split(":")[0] for key in handle.stats()["captured_graphs"]] == ["ids[batched_mm]"]


def test_an_unwrapped_model_is_freed():
    """Nothing bcg keeps process-wide (the probe's registered attention function, warning registries, hooks) holds a
    model after unwrap_model."""
    import gc
    import weakref

    model = tiny_model("qwen3_5_text")
    bcg.wrap_model(model, backend="eager")
    ids, mask = left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    bcg.unwrap_model(model)
    alive = [weakref.ref(model), weakref.ref(model.model), weakref.ref(model.model.layers[0].linear_attn)]
    del model
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True, True]  # the stack and a mixer, with their weights


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_fast_decode_graphs_run_bf16_experts_grouped(mode):
    """generate() switches bf16 MoE experts to batched_mm for decode steps on a GPU (fewer launches), which copies every
    selected expert's weights per token; graphs make launches free, so a fast decode graph runs grouped_mm (eager's
    other implementation, its tokens), an exact one eager's batched_mm. The model's own setting stays as it was."""
    reference, model = tiny_model("qwen3_moe").to(torch.bfloat16), tiny_model("qwen3_moe").to(torch.bfloat16)
    ids, mask = left_padded_batch(pads=(0, 0, 0))
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference.set_experts_implementation("grouped_mm" if mode == "fast" else "batched_mm")
    expected = reference.generate(ids, **options)
    handle = bcg.wrap_model(model, backend="eager", mode=mode, static_cache=False)
    model.set_experts_implementation("batched_mm")  # as generate() on a GPU
    tokens = model.generate(ids, **options)
    assert torch.equal(tokens, expected) and model.config._experts_implementation == "batched_mm"
    graphs = handle.stats()["captured_graphs"]
    decode_graph = min(graphs, key=lambda name: int(name.split(":")[1])).split(":")[0]  # 3 tokens: the smallest
    assert decode_graph == ("ids[grouped_mm]/fast" if mode == "fast" else "ids[batched_mm]"), graphs

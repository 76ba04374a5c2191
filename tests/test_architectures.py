"""Eager-backend parity on CPU (fp32) for every architecture in tiny_models: the whole runner, breaks and masks."""

import pytest
import torch

import bcg
from tiny_models import ARCHITECTURES, left_padded_batch, tiny_model

GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


def wrapped_equals_eager(reference, model, ids, mask, generate: dict = GENERATE, **wrap):
    """Eager logits and greedy tokens of ``reference``, then ``model`` wrapped (eager backend): logits equal on the
    real tokens, tokens identical. The handle, and the replays the forward call alone made."""
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    expected_tokens = reference.generate(ids, attention_mask=mask, **generate)
    handle = bcg.wrap_model(model, backend="eager", **wrap)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    replays_after_forward = handle.stats()["replays"]
    tokens = model.generate(ids, attention_mask=mask, **generate)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    return handle, replays_after_forward


def test_wrapped_matches_eager(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    handle, replays_after_forward = wrapped_equals_eager(model, model, ids, mask)
    stats = handle.stats()
    assert replays_after_forward == 1
    assert stats["replays"] == 1 + GENERATE["max_new_tokens"]  # prefill + one replay per decode step
    assert stats["rejects"] == {}

    bcg.unwrap_model(model)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, reference)

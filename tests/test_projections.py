"""Merged projections (bcg/projections.py): q/k/v and gate/up weights as row blocks of one tensor per group, unmerged
on unwrap; one GEMM per group inside capture runs, handed out to projections called on the same input.

On CPU: the merge itself, eager outputs (bit-identical), memory, unwrap, and the forwards bcg installs (run here with
the model's own ops beside the GEMM: the Triton kernels are for CUDA; tests/interpreted_kernels.py runs them too).
The GPU side (kernel counts, bf16 parity): tests/test_gpu.py.
"""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional

import bcg
from bcg import projections
from bcg.fusion import find_fusions
from bcg.projections import ProjectionGroup, SharedInputGEMM, merge, storage_users
from tiny_models import left_padded_batch, tiny_model

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def _merged(arch: str = "llama", **overrides):
    """A tiny model with its projections merged, the fusions that did it, and an untouched twin."""
    model, twin = tiny_model(arch, **overrides), tiny_model(arch, **overrides)
    fusions = find_fusions(model.model)
    fusions.merge_projections(model)
    return model, twin, fusions


def _is_row_blocks_of_one_tensor(tensors: list[torch.Tensor]) -> bool:
    storage = tensors[0].untyped_storage()
    offsets = list(itertools.accumulate((t.numel() for t in tensors[:-1]), initial=0))
    return (all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.is_contiguous() for t in tensors)
            and [t.storage_offset() for t in tensors] == offsets
            and storage.nbytes() == sum(t.nbytes for t in tensors))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_each_layers_qkv_and_gate_up_weights_become_row_blocks_of_one_tensor(arch):
    model = tiny_model(arch)
    before = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in before.items()}
    grads = {name: p.requires_grad for name, p in before.items()}
    memory = _storage_bytes(model)
    fusions = find_fusions(model.model)
    fusions.merge_projections(model)
    layers = model.model.layers
    assert fusions.qkv_attentions == [layer.self_attn for layer in layers]
    assert list(fusions.qkv) == [layer.self_attn for layer in layers]
    assert list(fusions.gate_up) == [layer.mlp for layer in layers]
    assert fusions.describe()["qkv_gemm"] == fusions.describe()["gate_up_gemm"] == len(layers)
    for layer in layers:
        for module, names in ((layer.self_attn, QKV), (layer.mlp, GATE_UP)):
            assert _is_row_blocks_of_one_tensor([getattr(module, name).weight for name in names])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad == grads[name] for name, p in after.items())
    assert all(torch.equal(p, values[name]) for name, p in after.items())
    assert _storage_bytes(model) == memory  # the originals are freed


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eager_outputs_are_bit_identical_after_merging(arch):
    model, twin, _ = _merged(arch)
    ids, mask = left_padded_batch()
    generate = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, twin(ids, attention_mask=mask).logits)
    assert torch.equal(model.generate(ids, **generate), twin.generate(ids, **generate))


def test_unmerge_gives_each_weight_its_own_storage_back():
    model, twin, fusions = _merged()
    before = dict(model.named_parameters())
    memory = _storage_bytes(model)
    fusions.unmerge_projections()
    assert fusions.qkv == {} and fusions.gate_up == {}
    assert all(p is before[name] for name, p in model.named_parameters())
    for name, p in model.named_parameters():
        assert p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.nbytes, name
        assert torch.equal(p, twin.get_parameter(name))
    assert _storage_bytes(model) == memory


def test_biases_merge_beside_their_weights():
    """Qwen2's q/k/v carry biases (its attention forward is not Llama's: merged here directly); at hidden size 128 each
    bias block starts 256-byte aligned."""
    model, twin = tiny_model("qwen2", hidden_size=128), tiny_model("qwen2", hidden_size=128)
    attention = model.model.layers[0].self_attn
    group = merge([getattr(attention, name) for name in QKV], storage_users(model))
    assert group is not None
    linears = group.linears
    assert _is_row_blocks_of_one_tensor([linear.weight for linear in linears])
    assert _is_row_blocks_of_one_tensor([linear.bias for linear in linears])
    x = torch.randn(2, 3, model.config.hidden_size)
    weights = group.weights()
    expected = [twin.model.layers[0].self_attn.get_submodule(name)(x) for name in QKV]
    assert all(torch.equal(got, want) for got, want in zip(weights.split(weights.linear(x)), expected))
    assert all(torch.equal(linear(x), want) for linear, want in zip(linears, expected))


class _Subclass(nn.Linear):
    pass


def _linears(*out_features: int, in_features: int = 64, bias: bool = False, cls: type = nn.Linear) -> list[nn.Linear]:
    return [cls(in_features, n, bias=bias) for n in out_features]


class _TensorSubclass(torch.Tensor):
    pass


def _with_subclass_weight(linears: list[nn.Linear]) -> list[nn.Linear]:
    linears[1].weight = nn.Parameter(linears[1].weight.detach().as_subclass(_TensorSubclass))
    return linears


def _users(linears: list[nn.Module]) -> dict:
    return storage_users(nn.ModuleList(linears))


@pytest.mark.parametrize("why, make", [
    ("a subclass (quantized, adapter)", lambda: _linears(64, 32, cls=_Subclass)),
    ("another input width", lambda: [nn.Linear(64, 64, bias=False), nn.Linear(32, 32, bias=False)]),
    ("another dtype", lambda: [nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False).double()]),
    ("biases on some", lambda: [nn.Linear(64, 64), nn.Linear(64, 32, bias=False)]),
    ("a block off 256-byte alignment", lambda: _linears(3, 5, in_features=10)),
    ("meta weights", lambda: _linears(64, 32, cls=lambda *a, **k: nn.Linear(*a, **k, device="meta"))),
    ("a tensor subclass (quantized, distributed)", lambda: _with_subclass_weight(_linears(64, 32))),
    ("one linear", lambda: _linears(64)),
])
def test_groups_that_do_not_qualify_are_left_alone(why, make):
    linears = make()
    weights = [linear.weight for linear in linears]
    assert merge(linears, _users(linears)) is None, why
    assert all(linear.weight is w and w.storage_offset() == 0 for linear, w in zip(linears, weights))


def test_hooked_tied_viewed_or_missing_projections_are_left_alone():
    hooked = _linears(64, 32)
    hooked[1].register_forward_hook(lambda *args: None)
    instance_forward = _linears(64, 32)
    instance_forward[0].forward = instance_forward[0].forward  # e.g. accelerate's
    tied = _linears(32, 32)
    tied[1].weight = tied[0].weight
    viewed = _linears(64, 32)
    viewed[0].weight.data = torch.randn(128, 64)[:64]  # a view of a larger storage: merging would free nothing
    shared_elsewhere = _linears(64, 32)
    outside = nn.Linear(64, 32, bias=False)
    outside.weight = shared_elsewhere[1].weight  # tied to a module outside the group
    for linears in (hooked, instance_forward, tied, viewed):
        assert merge(linears, _users(linears)) is None
    assert merge(shared_elsewhere, _users([*shared_elsewhere, outside])) is None
    assert merge([hooked[0], None], _users(hooked)) is None  # an attention without, say, v_proj


def test_a_tied_projection_in_a_model_is_not_merged():
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    attention.v_proj.weight = attention.k_proj.weight
    fusions = find_fusions(model.model)
    fusions.merge_projections(model)
    assert attention not in fusions.qkv and model.model.layers[1].self_attn in fusions.qkv
    assert attention.v_proj.weight is attention.k_proj.weight


def test_merging_under_inference_mode_leaves_normal_parameters():
    """wrap_model may run inside torch.inference_mode(): parameters made there would refuse load_state_dict after."""
    model, twin = tiny_model("llama"), tiny_model("llama")
    fusions = find_fusions(model.model)
    with torch.inference_mode():
        fusions.merge_projections(model)
    assert not any(p.is_inference() for p in model.parameters())
    model.load_state_dict(twin.state_dict())
    with torch.inference_mode():
        fusions.unmerge_projections()
    assert not any(p.is_inference() for p in model.parameters())


def _group(seed: int = 0) -> tuple[ProjectionGroup, list[nn.Linear]]:
    """Merged q/k/v-like projections, and unmerged copies of them."""
    torch.manual_seed(seed)
    linears = _linears(64, 32, 32)
    copies = [nn.Linear(64, n, bias=False) for n in (64, 32, 32)]
    for linear, copy in zip(linears, copies):
        copy.load_state_dict(linear.state_dict())
    return merge(linears, _users(linears)), copies


@pytest.fixture
def gemms(monkeypatch) -> list[torch.Size]:
    """The weight shape of each F.linear that projections.py runs (a group's GEMM, or one projection's own)."""
    shapes = []

    def linear(x, weight, bias=None):
        shapes.append(weight.shape)
        return functional.linear(x, weight, bias)

    monkeypatch.setattr(projections, "functional", SimpleNamespace(linear=linear))
    return shapes


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_projections_called_on_one_input_take_their_columns_of_one_gemm_in_any_order(order, gemms):
    group, copies = _group()
    forwards = SharedInputGEMM(group, group.weights()).forwards()
    x = torch.randn(2, 3, 64)
    outputs = {index: forwards[group.linears[index]](x) for index in order}
    assert gemms == [(128, 64)]
    assert all(torch.equal(outputs[index], copies[index](x)) for index in range(3))
    assert len({out.untyped_storage().data_ptr() for out in outputs.values()}) == 1  # columns of one output
    forwards[group.linears[0]](x)  # the group's columns all handed out: a later call runs the group's GEMM anew
    assert gemms == [(128, 64)] * 2


def test_a_projection_called_on_another_input_computes_its_own_linear(gemms):
    group, copies = _group()
    q, k, v = SharedInputGEMM(group, group.weights()).forwards().values()
    x = torch.randn(2, 3, 64)
    equal_but_another = x.clone()
    assert torch.equal(q(x), copies[0](x))
    assert torch.equal(k(equal_but_another), copies[1](x))  # not the same object: its own linear
    assert torch.equal(q(x), copies[0](x))  # q again, after it took its columns: its own linear
    x.mul_(2)  # the same object, changed in place since the GEMM read it
    assert torch.equal(v(x), copies[2](x))
    assert gemms == [(128, 64), (32, 64), (64, 64), (32, 64)]


def test_the_shared_gemm_tells_inputs_apart_under_inference_mode():
    """Inference tensors keep no version: the object itself tells the input."""
    group, copies = _group()
    with torch.inference_mode():
        q, k, v = SharedInputGEMM(group, group.weights()).forwards().values()
        x = torch.randn(2, 3, 64)
        outputs = q(x), k(x), v(x.clone())
        assert all(torch.equal(out, copy(x)) for out, copy in zip(outputs, copies))


def test_weights_given_storage_of_their_own_since_run_unmerged():
    """A cast or to() (every weight), or one weight assigned anew: the group's GEMM is no more (weights() None), and
    unmerge gives the rest storage of their own."""
    group, _ = _group()
    group.linears[2].weight.data = group.linears[2].weight.detach().clone()
    assert group.weights() is None
    group.unmerge()
    assert all(linear.weight.untyped_storage().nbytes() == linear.weight.nbytes for linear in group.linears)
    group, _ = _group()
    for linear in group.linears:
        linear.double()
    assert group.weights() is None
    group, _ = _group()
    group.linears[0].register_forward_pre_hook(lambda *args: None)  # a hook since: the linear runs as the model's
    assert group.weights() is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_capture_runs_compute_qkv_and_gate_up_in_one_gemm_each(arch, gemms):
    """fusion.Fusions.installed on CPU tensors (the kernels' own checks keep the model's ops beside the GEMMs): one
    GEMM per layer for q/k/v and one for gate/up, eager's logits, and nothing left installed after."""
    model, twin, fusions = _merged(arch)
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    qkv = sum(getattr(model.model.layers[0].self_attn, name).out_features for name in QKV)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = twin(ids, attention_mask=mask).logits
        with fusions.installed():
            logits = model(ids, attention_mask=mask).logits
    layers = model.config.num_hidden_layers
    assert sorted(gemms) == sorted([(qkv, hidden), (2 * intermediate, hidden)] * layers)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_wrap_merges_in_the_fast_mode_with_fused_kernels_and_unwrap_restores(monkeypatch):
    """Merged where fused kernels run (CUDA and triton: as if here), counted in stats(); the eager backend's runs of
    the fast graphs give eager's greedy tokens; unwrap gives every weight its own storage back."""
    monkeypatch.setattr(bcg.wrap, "unavailable_reason", lambda device: None)
    model, twin = tiny_model("qwen3"), tiny_model("qwen3")
    parameters = dict(model.named_parameters())
    memory = _storage_bytes(model)
    ids, mask = left_padded_batch()
    generate = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    handle = bcg.wrap_model(model, backend="eager")
    layers = model.config.num_hidden_layers
    fused = handle.stats()["fused_kernels"]
    assert fused["qkv_gemm"] == fused["gate_up_gemm"] == layers
    assert _storage_bytes(model) == memory
    assert torch.equal(model.generate(ids, **generate), twin.generate(ids, **generate))
    assert handle.stats()["rejects"] == {} and handle.stats()["full_graph_replays"] > 0
    bcg.unwrap_model(model)
    assert all(p is parameters[name] and p.untyped_storage().nbytes() == p.nbytes
               for name, p in model.named_parameters())
    assert _storage_bytes(model) == memory
    exact = bcg.wrap_model(model, backend="eager", mode="exact")
    assert exact.stats()["fused_kernels"] == {}
    assert all(p.untyped_storage().nbytes() == p.nbytes for p in model.parameters())  # exact mode merges nothing

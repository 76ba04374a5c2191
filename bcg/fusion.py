"""``fused_kernels=True``: swap the model's RMSNorm, rotary, SwiGLU and residual-add code for fused Triton kernels
while a stack is captured, and a full decode graph's static cache writes; run q/k/v and gate/up as one GEMM each.

Only code that is the same as Llama's (compared as bytecode, so any model copying it qualifies and any model that
changed it does not) is swapped, and only for the duration of a capture run: the graphs then replay one kernel
where the model launched two to ten, and nothing outside bcg's runs sees a difference. The projections that read one
input are merged at wrap time (projections.py: each group's weights become row blocks of one tensor, the same
parameters and values, so eager calls compute what they did): in a capture run an attention with Llama's or Qwen3's
forward computes q, k and v in one GEMM, and a matched MLP gate and up in one, whose halves its SiLU-and-product
kernel reads; the other GEMMs (o_proj, down_proj) stay the model's.
A decoder layer with Llama's forward runs bcg's copy of it, which adds the residual inside the post-attention norm's
kernel and calls every submodule (attention, where the breaks are, included) as Llama's does. An attention module with
Qwen3's forward keeps it, but its per-head q_norm and k_norm hand their input on unnormed and the rotary call after
them norms and rotates q and k in one kernel. In a full decode graph, the static cache layers' updates write keys and
values in one kernel. A call the kernels cannot take (a tensor not on CUDA, mixed dtypes, unusual shapes) runs the
model's own ops.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import CodeType, FunctionType, ModuleType
from typing import Any

import torch
from torch import nn

from . import hf, patching, projections

_ROPE_NAME = "apply_rotary_pos_emb"
# The rotary swap patches a modeling module that other models may share: one swap at a time (re-entrant, as
# nested swaps restore in order), so each puts back what it found.
_SWAP_LOCK = threading.RLock()


def unavailable_reason(device: torch.device) -> str | None:
    """Why fused kernels cannot run on ``device``, or None when they can."""
    if device.type != "cuda":
        return f"fused kernels run on CUDA only (model is on {device.type})"
    if importlib.util.find_spec("triton") is None:
        return "fused kernels need triton (pip install triton)"
    return None


def _code_signature(code: CodeType) -> tuple:
    """What a function does, without its name, docstring or line numbers."""
    consts = tuple(c for c in code.co_consts if not isinstance(c, str))
    return code.co_code, code.co_names, code.co_varnames, consts


def _same_code(fn: Any, reference: Callable) -> bool:
    """Same bytecode, looking through transformers' kernelizable function objects (hf.plain_function)."""
    fn, reference = hf.plain_function(fn), hf.plain_function(reference)
    return (isinstance(fn, FunctionType) and isinstance(reference, FunctionType)
            and _code_signature(fn.__code__) == _code_signature(reference.__code__))


def is_llama_rms_norm(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    weight = getattr(module, "weight", None)
    return (
        _same_code(forward, hf.LLAMA_RMS_NORM_FORWARD)
        and "forward" not in module.__dict__
        and isinstance(weight, torch.Tensor) and weight.ndim == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def is_llama_swiglu(module: nn.Module) -> bool:
    """An MLP with Llama's forward, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, whose act_fn is SiLU."""
    act_fn = getattr(module, "act_fn", None)
    return (
        _same_code(getattr(type(module), "forward", None), hf.LLAMA_MLP_FORWARD)
        and "forward" not in module.__dict__
        and type(act_fn) in hf.SILU_ACTIVATIONS and "forward" not in act_fn.__dict__
    )


def is_llama_decoder_layer(module: nn.Module) -> bool:
    """A layer with Llama's forward whose post-attention norm is Llama's RMSNorm (the norm the residual add joins)."""
    return (
        _same_code(inspect.unwrap(getattr(type(module), "forward", None)), hf.LLAMA_DECODER_LAYER_FORWARD)
        and "forward" not in module.__dict__
        and is_llama_rms_norm(getattr(module, "post_attention_layernorm", None))
    )


def is_qk_norm_rotary_attention(module: nn.Module) -> bool:
    """An attention module with Qwen3's forward, whose q_norm and k_norm are Llama's RMSNorm: each norm's output goes,
    transposed, to the rotary call and nowhere else, so that call can norm q and k itself (``_DeferredNorms``)."""
    return (
        _same_code(inspect.unwrap(getattr(type(module), "forward", None)), hf.QWEN3_ATTENTION_FORWARD)
        and "forward" not in module.__dict__
        and all(is_llama_rms_norm(getattr(module, name, None)) for name in ("q_norm", "k_norm"))
    )


def is_one_input_qkv_attention(module: nn.Module) -> bool:
    """An attention module with Llama's or Qwen3's forward: it calls q_proj, k_proj and v_proj once each, in that
    order, on the same hidden states (what one GEMM over their merged weights can stand in for)."""
    forward = inspect.unwrap(getattr(type(module), "forward", None))
    return ((_same_code(forward, hf.LLAMA_ATTENTION_FORWARD) or _same_code(forward, hf.QWEN3_ATTENTION_FORWARD))
            and "forward" not in module.__dict__)


def has_llama_rotary(modeling: ModuleType) -> bool:
    return _same_code(getattr(modeling, _ROPE_NAME, None), hf.LLAMA_ROTARY) and _same_code(
        getattr(modeling, "rotate_half", None), hf.LLAMA_ROTATE_HALF
    )


def _kernels_take(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    if not first.is_cuda:  # before importing the kernels: triton may not even be installed on a CPU machine
        return False
    from .kernels import SUPPORTED_DTYPES

    return (
        first.dtype in SUPPORTED_DTYPES
        and all(t.device == first.device and t.dtype == first.dtype for t in tensors)
    )


def _rms_norm_takes(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_kernels_take(hidden_states, weight) and hidden_states.stride(-1) == 1
            and weight.shape[0] == hidden_states.shape[-1])


def _fused_rms_norm_forward(module: nn.Module, original: Callable, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _rms_norm_takes(hidden_states, module.weight):
        return original(hidden_states)
    from .kernels import rms_norm

    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _fused_swiglu_forward(mlp: nn.Module, gate_up: projections.MergedWeights | None, x: torch.Tensor) -> torch.Tensor:
    """Llama's MLP forward with the activation and the product in one kernel; gate and up in one GEMM where their
    weights are merged (``gate_up``: the kernel reads the two halves of its output), else the model's two."""
    gate, up = gate_up.split(gate_up.linear(x)) if gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
    if not (_kernels_take(gate, up) and gate.shape == up.shape and _dense_rows(gate) and _dense_rows(up)):
        return mlp.down_proj(mlp.act_fn(gate) * up)
    from .kernels import silu_mul

    return mlp.down_proj(silu_mul(gate, up))


def _dense_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` is rows of its dense last dim at one row stride (viewable as ``[rows, last dim]``, as silu_mul
    reads it): a contiguous tensor, or a column block of one."""
    if x.ndim == 0 or x.stride(-1) != 1:
        return False
    outer = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size > 1]
    return all(stride == size_in * stride_in for (_, stride), (size_in, stride_in) in zip(outer, outer[1:]))


def _fused_decoder_layer_forward(layer: nn.Module, signature: inspect.Signature, /, *args: Any,
                                 **kwargs: Any) -> torch.Tensor:
    """Llama's decoder layer forward with ``residual + hidden_states`` added inside the post-attention norm's kernel.

    Like Llama's, it hands attention every argument it was given but the hidden states, by name, defaults included
    (``signature``: the layer's own, so the cache goes under the installed transformers' name). The wrappers around
    the class forward (gradient checkpointing, a deprecated argument name) have nothing to do in bcg's no-grad runs.
    """
    arguments = signature.bind(*args, **kwargs)
    arguments.apply_defaults()
    attention_kwargs = dict(arguments.arguments)
    hidden_states = attention_kwargs.pop(next(iter(signature.parameters)))
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            attention_kwargs.update(attention_kwargs.pop(parameter.name))
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    hidden_states, _ = layer.self_attn(hidden_states=hidden_states, **attention_kwargs)
    hidden_states, residual = _add_rms_norm(layer.post_attention_layernorm, hidden_states, residual)
    hidden_states = layer.mlp(hidden_states)
    return residual + hidden_states


def _add_rms_norm(norm: nn.Module, hidden_states: torch.Tensor,
                  residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``norm(residual + hidden_states)``, ``residual + hidden_states``)."""
    if not (_rms_norm_takes(hidden_states, norm.weight) and _rms_norm_takes(residual, norm.weight)
            and residual.shape == hidden_states.shape):
        hidden_states = residual + hidden_states
        return norm(hidden_states), hidden_states
    from .kernels import add_rms_norm

    return add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)


class _DeferredNorms:
    """The q_norm and k_norm calls of the attention forward under way, left to its rotary call, which runs them in its
    kernel. Qwen3's forward (``is_qk_norm_rotary_attention``) hands each norm's output, transposed, to
    ``apply_rotary_pos_emb`` and to nothing else: the norms return their input as it is and the rotary call norms what
    it is handed. One that gets other tensors than the norms' outputs raises (code that read a norm's output elsewhere
    would have run on unnormed heads: the capture fails and that size stays eager), as does a stack run that ends with
    a norm left undone."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, nn.Module]] = []  # (a norm's input, the norm), in call order

    def norm(self, norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """A q_norm / k_norm forward while installed: deferred where the kernel takes the heads, else run now."""
        if not (hidden_states.ndim == 4 and _rms_norm_takes(hidden_states, norm.weight)):
            return _bound_forward(norm)(hidden_states)
        self.pending.append((hidden_states, norm))
        return hidden_states

    def take(self, q: torch.Tensor, k: torch.Tensor) -> tuple[nn.Module | None, nn.Module | None]:
        """The norms deferred for the rotary call's q and k (None: not a deferred norm's output)."""
        pending, self.pending = self.pending, []
        norms = [next((norm for raw, norm in pending if _is_transposed(x, raw)), None) for x in (q, k)]
        if len(pending) != sum(norm is not None for norm in norms):
            raise RuntimeError("bcg: a q_norm / k_norm output reached other code than the rotary call after it; the "
                               "attention code differs from Qwen3's, whose norms bcg fuses into its rotary kernel")
        return norms[0], norms[1]

    def check_done(self) -> None:
        if self.pending:
            raise RuntimeError("bcg: a q_norm / k_norm output never reached a rotary call; the attention code differs "
                               "from Qwen3's, whose norms bcg fuses into its rotary kernel")


def _is_transposed(x: torch.Tensor, raw: torch.Tensor) -> bool:
    """Whether ``x`` is ``raw.transpose(1, 2)``: the same elements, seen the same way."""
    transposed = raw.transpose(1, 2)
    return (x.data_ptr() == transposed.data_ptr() and x.dtype == transposed.dtype
            and x.shape == transposed.shape and x.stride() == transposed.stride())


def _fused_rotary(original: Callable, deferred: _DeferredNorms) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        q_norm, k_norm = deferred.take(q, k)
        plain = not args and kwargs.keys() <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1
        if not (plain and _rotary_takes(q, k, cos, sin)):
            return original(_normed_heads(q_norm, q), _normed_heads(k_norm, k), cos, sin, *args, **kwargs)
        from .kernels import rotary

        if q_norm is None or k_norm is None:  # no norms (Llama), or one alone: it runs first, as the model's
            return rotary(_normed_heads(q_norm, q), _normed_heads(k_norm, k), cos, sin)
        return rotary(q, k, cos, sin, norms=((q_norm.weight, q_norm.variance_epsilon),
                                             (k_norm.weight, k_norm.variance_epsilon)))

    return apply_rotary_pos_emb


def _normed_heads(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, H, S, D]``: a deferred norm's input, transposed) as the model's norm of it, transposed, would be;
    ``x`` itself where no norm was deferred for it."""
    return x if norm is None else _bound_forward(norm)(x.transpose(1, 2)).transpose(1, 2)


def _cache_write_takes(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                       length: torch.Tensor) -> bool:
    """Whether one kernel can write a step's keys and values where index_copy_ would: ``[B, H, *, D]`` tensors of one
    dtype and batch and head count, dense last dims, a 0-dim integer counter on their device."""
    tensors = (keys, values, new_keys, new_values)
    if not (_kernels_take(*tensors) and all(t.ndim == 4 and t.stride(-1) == 1 for t in tensors)):
        return False
    return (
        keys.shape[:2] == values.shape[:2] == new_keys.shape[:2] == new_values.shape[:2]
        and new_keys.shape[2] == new_values.shape[2]
        and new_keys.shape[3] == keys.shape[3] and new_values.shape[3] == values.shape[3]
        and length.ndim == 0 and not length.is_floating_point() and length.device == keys.device
    )


def _fused_cache_update(layer: Any, original: Callable, key_states: torch.Tensor, value_states: torch.Tensor,
                        *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A StaticLayer's update (hf.plain_static_layers) with keys and values written by one kernel at the position the
    length counter holds, read on the device (transformers builds the positions from it in two kernels and copies
    keys and values in two more), then the counter advanced as transformers advances it."""
    keys, values, length = hf.static_layer_tensors(layer)
    if not _cache_write_takes(keys, values, key_states, value_states, length):
        return original(key_states, value_states, *args, **kwargs)
    from .kernels import write_cache

    write_cache(keys, values, key_states, value_states, length)
    length.add_(key_states.shape[-2])
    return keys, values


@contextmanager
def _cache_updates_fused(cache: Any) -> Iterator[None]:
    """The cache's StaticLayers update through ``_fused_cache_update`` for the duration (one stack run)."""
    layers = hf.plain_static_layers(cache)
    for layer in layers:
        layer.update = partial(_fused_cache_update, layer, type(layer).update.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.update


def _rotary_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if q.ndim != 4 or k.ndim != 4 or cos.ndim != 3 or not _kernels_take(q, k, cos, sin):
        return False
    batch, _, seq_len, dim = q.shape
    return (
        dim % 2 == 0 and k.shape[0] == batch and k.shape[2] == seq_len and k.shape[3] == dim
        and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.shape[1:] == (seq_len, dim)
        and cos.shape[0] in (1, batch) and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
    )


@dataclass
class Fusions:
    """The modules and modeling modules of one stack whose code bcg can replace with fused kernels."""

    norms: list[nn.Module] = field(default_factory=list)
    rotary_modules: list[ModuleType] = field(default_factory=list)
    mlps: list[nn.Module] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)  # decoder layers whose residual add joins their norm
    attentions: list[nn.Module] = field(default_factory=list)  # attention whose q/k norms join the rotary kernel
    qkv_attentions: list[nn.Module] = field(default_factory=list)  # attention that calls q/k/v on one input
    cache_layers: int = 0  # static cache layers whose update a full decode graph writes in one kernel
    unmatched: list[str] = field(default_factory=list)  # classes and rotary code that look like Llama's but differ
    # What merge_projections merged (wrap time): a qkv_attention's q/k/v, a matched MLP's gate/up
    qkv: dict[nn.Module, projections.ProjectionGroup] = field(default_factory=dict)
    gate_up: dict[nn.Module, projections.ProjectionGroup] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.norms or self.rotary_modules or self.mlps or self.layers or self.cache_layers or self.qkv)

    def describe(self) -> dict[str, Any]:
        return {"rms_norm": len(self.norms), "rotary": len(self.rotary_modules), "swiglu": len(self.mlps),
                "add_rms_norm": len(self.layers), "qk_norm_rotary": len(self.attentions),
                "cache_write": self.cache_layers, "qkv_gemm": len(self.qkv), "gate_up_gemm": len(self.gate_up),
                "unmatched": list(self.unmatched)}

    def merge_projections(self, model: nn.Module) -> None:
        """Merge each qkv_attention's q/k/v weights and each matched MLP's gate/up weights where they qualify
        (projections.merge: plain nn.Linears, untied, ...); ``model``: the whole model, whose tensors tell which
        weights are tied."""
        users = projections.storage_users(model)
        for modules, merged, names in ((self.qkv_attentions, self.qkv, ("q_proj", "k_proj", "v_proj")),
                                       (self.mlps, self.gate_up, ("gate_proj", "up_proj"))):
            for module in modules:
                group = projections.merge([getattr(module, name, None) for name in names], users)
                if group is not None:
                    merged[module] = group
        projections.release_freed_weights([*self.qkv.values(), *self.gate_up.values()])

    def unmerge_projections(self) -> None:
        """Storage of its own for every merged weight again (unwrap_model)."""
        for group in [*self.qkv.values(), *self.gate_up.values()]:
            group.unmerge()
        self.qkv.clear()
        self.gate_up.clear()

    @contextmanager
    def installed(self, cache: Any = None) -> Iterator[None]:
        """The fused code in place of the model's for the duration (one stack run), then the model's again; ``cache``:
        the one a full decode graph's run updates (its static layers' writes fused too)."""
        with _SWAP_LOCK:
            deferred = _DeferredNorms()
            saved_rotary = [(m, getattr(m, _ROPE_NAME)) for m in self.rotary_modules]
            for modeling, original in saved_rotary:
                setattr(modeling, _ROPE_NAME, _fused_rotary(original, deferred))
            try:
                with patching.forwards_replaced(self._forwards(deferred)), \
                        _cache_updates_fused(cache if self.cache_layers else None):
                    yield
                deferred.check_done()
            finally:
                for modeling, original in saved_rotary:
                    setattr(modeling, _ROPE_NAME, original)

    def _forwards(self, deferred: _DeferredNorms) -> dict[nn.Module, Callable]:
        """bcg's forward for each module that has no instance ``forward`` of its own (one set since, such as a hook
        library's, stays), and for each layer whose post-attention norm has none either; a matched attention's q/k
        norms leave their work to the rotary call (``deferred``); the projections of a merged group still merged and
        plain (``ProjectionGroup.weights``) share its GEMM, made anew for this run."""
        forwards: dict[nn.Module, Callable] = {}
        for layer in _class_forward_only(self.layers):
            if "forward" not in layer.post_attention_layernorm.__dict__:
                signature = inspect.signature(type(layer).forward.__get__(layer))
                forwards[layer] = partial(_fused_decoder_layer_forward, layer, signature)
        forwards.update({norm: _bound_forward(norm) for norm in _class_forward_only(self.norms)})
        attentions = _class_forward_only(self.attentions)
        qk_norms = [attention.q_norm for attention in attentions] + [attention.k_norm for attention in attentions]
        forwards.update({norm: partial(deferred.norm, norm) for norm in _class_forward_only(qk_norms)})
        for attention, group in self.qkv.items():
            if "forward" not in attention.__dict__ and (weights := group.weights()) is not None:
                forwards.update(projections.SharedInputGEMM(group, weights).forwards())
        for mlp in _class_forward_only(self.mlps):
            group = self.gate_up.get(mlp)
            forwards[mlp] = partial(_fused_swiglu_forward, mlp, group.weights() if group is not None else None)
        return forwards


def _class_forward_only(modules: list[nn.Module]) -> list[nn.Module]:
    return [m for m in modules if "forward" not in m.__dict__]


def _bound_forward(norm: nn.Module) -> Callable:
    original = type(norm).forward.__get__(norm)
    return lambda hidden_states: _fused_rms_norm_forward(norm, original, hidden_states)


def find_fusions(stack: nn.Module) -> Fusions:
    """Every Llama-style RMSNorm, SwiGLU MLP and decoder layer inside ``stack``, every modeling module of its layers
    with Llama's rotary code and every attention with Llama's or Qwen3's forward (nothing merged yet); RMSNorm
    classes, rotary functions, SiLU MLPs with gate/up/down projections and layers with a Llama RMSNorm after attention
    that differ from Llama's code are named in ``unmatched`` (not fused)."""
    fusions = Fusions()
    seen_modeling: set[str] = set()
    unmatched: dict[str, None] = {}
    for module in stack.modules():
        if is_llama_rms_norm(module):
            fusions.norms.append(module)
        elif type(module).__name__.endswith("RMSNorm"):
            unmatched[type(module).__name__] = None
        if is_llama_swiglu(module):
            fusions.mlps.append(module)
        elif _looks_like_swiglu(module):
            unmatched[type(module).__name__] = None
        if is_llama_decoder_layer(module):
            fusions.layers.append(module)
        elif _looks_like_llama_layer(module):
            unmatched[type(module).__name__] = None
        name = type(module).__module__
        if name not in seen_modeling:
            seen_modeling.add(name)
            modeling = sys.modules.get(name)
            if modeling is not None and has_llama_rotary(modeling):
                fusions.rotary_modules.append(modeling)
            elif modeling is not None and hasattr(modeling, _ROPE_NAME):
                unmatched[f"{name.rsplit('.', 1)[-1]}.{_ROPE_NAME}"] = None
    fusions.attentions = [module for module in stack.modules() if is_qk_norm_rotary_attention(module)
                          and _forward_module(module) in fusions.rotary_modules]
    fusions.qkv_attentions = [module for module in stack.modules() if is_one_input_qkv_attention(module)]
    fusions.cache_layers = hf.plain_static_layer_count(getattr(stack, "config", None))
    fusions.unmatched = list(unmatched)
    return fusions


def _forward_module(module: nn.Module) -> ModuleType | None:
    """The modeling module whose globals (its rotary function) the module's class forward reads."""
    return sys.modules.get(inspect.unwrap(type(module).forward).__module__)


def _looks_like_swiglu(module: nn.Module) -> bool:
    """Llama's MLP submodules and a SiLU: transformers or the model wrote other code for it."""
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)) in hf.SILU_ACTIVATIONS)


def _looks_like_llama_layer(module: nn.Module) -> bool:
    """Llama's decoder layer submodules, with Llama's RMSNorm after attention: other code runs them."""
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("self_attn", "mlp", "input_layernorm"))
            and is_llama_rms_norm(getattr(module, "post_attention_layernorm", None)))

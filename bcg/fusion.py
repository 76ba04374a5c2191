"""``fused_kernels=True``: swap the model's RMSNorm and rotary code for fused Triton kernels while a stack is captured.

Only code that is the same as Llama's (compared as bytecode, so any model copying it qualifies and any model that
changed it does not) is swapped, and only for the duration of a capture run: the graphs then replay one kernel
where the model launched eight or ten, and nothing outside bcg's runs sees a difference. A call the kernels cannot
take (a tensor not on CUDA, mixed dtypes, unusual shapes) runs the model's own code.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import CodeType, FunctionType, ModuleType
from typing import Any

import torch
from torch import nn

from . import hf, patching

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


def _fused_rms_norm_forward(module: nn.Module, original: Callable, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if not (_kernels_take(hidden_states, weight) and hidden_states.stride(-1) == 1
            and weight.shape[0] == hidden_states.shape[-1]):
        return original(hidden_states)
    from .kernels import rms_norm

    return rms_norm(hidden_states, weight, module.variance_epsilon)


def _fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and kwargs.keys() <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1
        if not (plain and _rotary_takes(q, k, cos, sin)):
            return original(q, k, cos, sin, *args, **kwargs)
        from .kernels import rotary

        return rotary(q, cos, sin), rotary(k, cos, sin)

    return apply_rotary_pos_emb


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
    """The norm modules and modeling modules of one stack whose code bcg can replace with fused kernels."""

    norms: list[nn.Module] = field(default_factory=list)
    rotary_modules: list[ModuleType] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # RMSNorm classes and rotary code seen but unlike Llama's

    def __bool__(self) -> bool:
        return bool(self.norms or self.rotary_modules)

    def describe(self) -> dict[str, Any]:
        return {"rms_norm": len(self.norms), "rotary": len(self.rotary_modules), "unmatched": list(self.unmatched)}

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The fused code in place of the model's for the duration (one stack run), then the model's again."""
        with _SWAP_LOCK:
            norms = [n for n in self.norms if "forward" not in n.__dict__]  # leave a forward set since alone
            saved_rotary = [(m, getattr(m, _ROPE_NAME)) for m in self.rotary_modules]
            for modeling, original in saved_rotary:
                setattr(modeling, _ROPE_NAME, _fused_rotary(original))
            try:
                with patching.forwards_replaced({norm: _bound_forward(norm) for norm in norms}):
                    yield
            finally:
                for modeling, original in saved_rotary:
                    setattr(modeling, _ROPE_NAME, original)


def _bound_forward(norm: nn.Module) -> Callable:
    original = type(norm).forward.__get__(norm)
    return lambda hidden_states: _fused_rms_norm_forward(norm, original, hidden_states)


def find_fusions(stack: nn.Module) -> Fusions:
    """Every Llama-style RMSNorm inside ``stack`` and every modeling module of its layers with Llama's rotary code;
    RMSNorm classes and rotary functions that differ from Llama's are named in ``unmatched`` (not fused)."""
    fusions = Fusions()
    seen_modeling: set[str] = set()
    unmatched: dict[str, None] = {}
    for module in stack.modules():
        if is_llama_rms_norm(module):
            fusions.norms.append(module)
        elif type(module).__name__.endswith("RMSNorm"):
            unmatched[type(module).__name__] = None
        name = type(module).__module__
        if name not in seen_modeling:
            seen_modeling.add(name)
            modeling = sys.modules.get(name)
            if modeling is not None and has_llama_rotary(modeling):
                fusions.rotary_modules.append(modeling)
            elif modeling is not None and hasattr(modeling, _ROPE_NAME):
                unmatched[f"{name.rsplit('.', 1)[-1]}.{_ROPE_NAME}"] = None
    fusions.unmatched = list(unmatched)
    return fusions

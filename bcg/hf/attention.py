"""transformers' attention functions: the registry bcg adds its break to, the functions a model calls, SDPA's GQA."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def register_attention(name: str, function: Callable, masks_of: str | None = None) -> None:
    """Register ``function`` as attention implementation ``name``; ``masks_of``: the implementation whose mask function
    the stack should use under ``name`` (without one transformers builds no mask, which models that read the mask
    themselves, as indexed attention does, cannot run on)."""
    AttentionInterface.register(name, function)
    if (masks := ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(masks_of)) is not None:
        AttentionMaskInterface.register(name, masks)


def attention_function(implementation: str | None, module: nn.Module) -> Callable:
    """The function the model itself calls for ``implementation`` (its modeling file's own for "eager")."""
    if implementation in (None, "eager"):
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise NotImplementedError(f"{type(module).__name__} has no module-level eager_attention_forward")
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


_MASKED_GQA = threading.local()  # which threads are inside masked_gqa_in_sdpa
_MASKED_GQA_LOCK = threading.Lock()
_masked_gqa_users = 0
_original_use_gqa_in_sdpa = sdpa_attention.use_gqa_in_sdpa


@contextmanager
def masked_gqa_in_sdpa() -> Iterator[None]:
    """While active in this thread, transformers' SDPA attention hands grouped keys/values to torch with
    ``enable_gqa`` even beside a mask, where it would otherwise repeat them per query head (flash and memory-efficient
    kernels take no mask with GQA). Only where a kernel takes both: on CPU, and on CUDA devices where cuDNN attention
    runs (sm90+; cuDNN plans on the host per shape, so only captured graphs should use it). H200, decode over 512
    cached positions: 13-14 µs per call against 21 µs (batch 1) to 103 µs (batch 8, 32 query heads) with the repeat.
    Other threads keep transformers' choice; the hook is installed while any thread is inside."""
    global _masked_gqa_users
    with _MASKED_GQA_LOCK:
        _masked_gqa_users += 1
        sdpa_attention.use_gqa_in_sdpa = _use_gqa_in_sdpa
    _MASKED_GQA.active = True
    try:
        yield
    finally:
        _MASKED_GQA.active = False
        with _MASKED_GQA_LOCK:
            _masked_gqa_users -= 1
            if _masked_gqa_users == 0:
                sdpa_attention.use_gqa_in_sdpa = _original_use_gqa_in_sdpa


def _use_gqa_in_sdpa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    if attention_mask is None or not getattr(_MASKED_GQA, "active", False) or not _takes_masked_gqa(key.device):
        return _original_use_gqa_in_sdpa(attention_mask, key, value)
    return key.shape[-1] == value.shape[-1] <= 256


def _takes_masked_gqa(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return (device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def attention_implementation_of(config: Any) -> str | None:
    return config._attn_implementation


def attention_configs(module: nn.Module) -> list[Any]:
    """Every distinct config object the stack's modules read their attention implementation from."""
    seen: dict[int, Any] = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def attention_implementation(configs: list[Any], name: str) -> Iterator[None]:
    """Point every config the stack reads at ``name`` for the duration (without touching sub-configs)."""
    saved = [(config, config._attn_implementation_internal) for config in configs]
    for config in configs:
        config._attn_implementation_internal = name
    try:
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value

"""Can this call (or this model at all) run on the graphs? Every "no" has a named reason; the answer is then eager."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)

if TYPE_CHECKING:
    from .runner import StackRunner

_SUPPORTED_CACHES = (DynamicCache, StaticCache)
_SUPPORTED_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")
# Arguments a stack forward may receive that bcg understands (or that change nothing it computes).
KNOWN_ARGUMENTS = frozenset(
    {"input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache",
     "cache_position", "return_dict", *_OUTPUT_FLAGS}
)


@dataclass
class Call:
    """The arguments of one stack forward call, by name."""

    arguments: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        return self.arguments.get(name)

    @property
    def tokens(self) -> torch.Tensor | None:
        ids = self.get("input_ids")
        return ids if ids is not None else self.get("inputs_embeds")

    @property
    def kind(self) -> str:
        return "ids" if self.get("input_ids") is not None else "embeds"


def _flag(call: Call, name: str, config: Any) -> bool:
    value = call.get(name)
    return bool(getattr(config, name, False) if value is None else value)


def _cache_supported(cache: Any) -> bool:
    if cache is None:
        return True
    if type(cache) not in _SUPPORTED_CACHES or getattr(cache, "offloading", False):
        return False
    return all(isinstance(layer, _SUPPORTED_CACHE_LAYERS) for layer in getattr(cache, "layers", ()))


def _input_problem(runner: StackRunner, call: Call) -> str | None:
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        return "bad_input"
    if ids is not None and (ids.ndim != 2 or ids.dtype.is_floating_point):
        return "bad_input"
    if embeds is not None and (embeds.ndim != 3 or embeds.dtype != runner.dtype):
        return "bad_input"
    if call.tokens.shape[0] * call.tokens.shape[1] == 0:
        return "empty_input"
    return None


def _device_problem(runner: StackRunner, call: Call) -> str | None:
    for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.device != runner.device:
            return "wrong_device"
    return None


def _shape_problem(call: Call) -> str | None:
    batch, seq = call.tokens.shape[:2]
    positions = call.get("position_ids")
    if positions is not None and (positions.ndim != 2 or positions.shape[-1] != seq or positions.shape[0] not in (1, batch)):
        return "unsupported_position_ids"
    mask = call.get("attention_mask")
    if mask is None or isinstance(mask, dict):
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 4) or mask.shape[0] != batch:
        return "unsupported_mask"
    return None


def reject_reason(runner: StackRunner, call: Call) -> str | None:
    """Why this call must run eagerly, or None when it can replay."""
    if runner.disabled_reason is not None:
        return "not_ready"
    if runner.model.training:
        return "training"
    if torch.is_grad_enabled() and runner.needs_grad(call):
        return "grad_enabled"
    for flag in _OUTPUT_FLAGS:
        if _flag(call, flag, runner.config):
            return flag
    if call.extra:
        return "unsupported_argument"
    problem = _input_problem(runner, call) or _device_problem(runner, call) or _shape_problem(call)
    if problem:
        return problem
    if not _cache_supported(call.get("past_key_values")):
        return "unsupported_cache"
    num_tokens = call.tokens.shape[0] * call.tokens.shape[1]
    bucket = runner.bucket_for(num_tokens)
    if bucket is None:
        return "too_many_tokens"
    if bucket > 2 * num_tokens:
        return "padding_waste"
    if (call.kind, bucket) in runner.failed:
        return "capture_failed"
    return None


def model_unsupported_reason(model: Any, config: Any) -> str | None:
    """Why this model as a whole must stay eager (said once, in a warning), or None."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return "some weights are on the meta device (not loaded)"
    device_map = getattr(model, "hf_device_map", None) or {}
    placements = {str(v) for v in device_map.values()}
    if placements & {"cpu", "disk"}:
        return "accelerate offloads weights to cpu/disk; graphs need every weight resident on one GPU"
    if len(placements) > 1:
        return f"the model is split across devices {sorted(placements)}; bcg captures single-device models"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - _ATTENTION_LAYER_TYPES:
        return f"layer types {sorted(layer_types - _ATTENTION_LAYER_TYPES)} are not plain attention (recurrent mixers)"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_sets = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    if any(isinstance(r, dict) and r.get("rope_type", r.get("type")) in ("dynamic", "longrope") for r in rope_sets):
        return "dynamic RoPE recomputes frequencies from the sequence length at run time"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation.startswith("paged"):
        return f"attention implementation '{implementation}' manages its own cache"
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface"
    return None

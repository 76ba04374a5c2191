"""Can this call (or this model at all) run on the graphs? Every "no" has a named reason; the answer is then eager."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import hf
from .call import Call


class Reject(str, enum.Enum):
    """Why a call ran eagerly: the keys of ``stats()["rejects"]``."""

    NOT_READY = "not_ready"
    REENTRANT = "reentrant"
    TRAINING = "training"
    GRAD_ENABLED = "grad_enabled"
    OUTPUT_ATTENTIONS = "output_attentions"
    OUTPUT_HIDDEN_STATES = "output_hidden_states"
    OUTPUT_ROUTER_LOGITS = "output_router_logits"
    UNSUPPORTED_ARGUMENT = "unsupported_argument"
    BAD_INPUT = "bad_input"
    EMPTY_INPUT = "empty_input"
    WRONG_DEVICE = "wrong_device"
    UNSUPPORTED_POSITION_IDS = "unsupported_position_ids"
    UNSUPPORTED_MASK = "unsupported_mask"
    MASK_FAILED = "mask_failed"
    UNSUPPORTED_CACHE = "unsupported_cache"
    TOO_MANY_TOKENS = "too_many_tokens"
    PADDING_WASTE = "padding_waste"
    CAPTURE_FAILED = "capture_failed"
    VERIFICATION_FAILED = "verification_failed"


# Rejects that will come back on every call of the same kind: said once in a warning, with what to do.
REPEATING = {
    Reject.GRAD_ENABLED: "run inference under torch.no_grad() or torch.inference_mode() (generate() does), or "
                         "freeze the weights with model.requires_grad_(False)",
    Reject.UNSUPPORTED_ARGUMENT: "bcg does not know what it changes; if it changes nothing the stack computes, "
                                 "report it (with your transformers version) so bcg can accept it",
    Reject.UNSUPPORTED_CACHE: "use the cache generate() makes (a DynamicCache or StaticCache; a model's own cache "
                              "class where it has one) to get replays",
    Reject.UNSUPPORTED_MASK: "pass a 2D padding mask [batch, length] (or a 4D mask / dict as generate() builds)",
    Reject.MASK_FAILED: "transformers' mask utilities failed on this call; please report it with your transformers "
                        "version",
    Reject.UNSUPPORTED_POSITION_IDS: "pass position_ids as [batch, length] or [1, length]",
    Reject.WRONG_DEVICE: "put the inputs on the model's device",
    Reject.TOO_MANY_TOKENS: "wrap with a larger max_num_tokens (or capture_sizes) to replay such calls",
}

_OUTPUT_FLAGS = {
    "output_attentions": Reject.OUTPUT_ATTENTIONS,
    "output_hidden_states": Reject.OUTPUT_HIDDEN_STATES,
    "output_router_logits": Reject.OUTPUT_ROUTER_LOGITS,
}
# Arguments a stack forward may receive that bcg understands (or that change nothing it computes).
KNOWN_ARGUMENTS = frozenset(
    {"input_ids", "attention_mask", "position_ids", *hf.CACHE_ARGUMENTS, "inputs_embeds", "use_cache",
     "cache_position", "return_dict", *_OUTPUT_FLAGS,
     # Gemma 4 (5.24+) passes it so its stack may cut the last layers' work to the kept tokens; bcg returns every
     # position and the CausalLM slices, so the logits are the same.
     "logits_to_keep"}
)


@dataclass
class Target:
    """What a call is checked against: the wrapped stack, where its weights live, and the captured sizes."""

    module: nn.Module
    config: Any
    device: torch.device
    dtype: torch.dtype
    sizes: list[int]
    cache_class: type  # the cache class the stack makes for itself (hf.stack_cache_class)
    # config attributes every call reads, through readers that skip the config's slow attribute lookup
    flags: dict[str, Callable[[], Any]] = field(init=False)  # the output flags
    use_cache: Callable[[], Any] = field(init=False)
    implementation: Callable[[], str | None] = field(init=False)  # the attention implementation

    def __post_init__(self) -> None:
        self.flags = {name: hf.attribute_reader(self.config, name, False) for name in _OUTPUT_FLAGS}
        self.use_cache = hf.attribute_reader(self.config, "use_cache", True)
        self.implementation = hf.attribute_reader(self.config, "_attn_implementation")


@dataclass(frozen=True)
class Rejection:
    reason: Reject
    detail: str = ""  # what exactly, for the once-only warning of a repeating reject

    def describe(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


def _flag(call: Call, name: str, target: Target) -> bool:
    value = call.get(name)
    return bool(target.flags[name]() if value is None else value)


def _needs_grad(call: Call, target: Target) -> bool:
    embeds = call.get("inputs_embeds")
    if embeds is not None and embeds.requires_grad:
        return True
    return any(p.requires_grad for p in target.module.parameters())


def _input_problem(call: Call, target: Target) -> Rejection | None:
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        return Rejection(Reject.BAD_INPUT)
    if ids is not None and (ids.ndim != 2 or ids.dtype.is_floating_point):
        return Rejection(Reject.BAD_INPUT)
    if embeds is not None and (embeds.ndim != 3 or embeds.dtype != target.dtype):
        return Rejection(Reject.BAD_INPUT)
    if call.tokens.shape[0] * call.tokens.shape[1] == 0:
        return Rejection(Reject.EMPTY_INPUT)
    return None


def _device_problem(call: Call, target: Target) -> Rejection | None:
    for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.device != target.device:
            return Rejection(Reject.WRONG_DEVICE, f"{name} on {value.device}, model on {target.device}")
    return None


def _shape_problem(call: Call) -> Rejection | None:
    batch, seq = call.tokens.shape[:2]
    positions = call.get("position_ids")
    if positions is not None and (
        positions.ndim != 2 or positions.shape[-1] != seq or positions.shape[0] not in (1, batch)
    ):
        return Rejection(Reject.UNSUPPORTED_POSITION_IDS, f"position_ids of shape {tuple(positions.shape)}")
    mask = call.get("attention_mask")
    if mask is None or isinstance(mask, dict):
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 4) or mask.shape[0] != batch:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        return Rejection(Reject.UNSUPPORTED_MASK, f"attention_mask {shape}")
    return None


def reject_reason(call: Call, target: Target) -> Rejection | None:
    """Why this call's inputs must run eagerly, or None when they can replay (the tokens' bucket is the plan's)."""
    if target.module.training:
        return Rejection(Reject.TRAINING)
    if torch.is_grad_enabled() and _needs_grad(call, target):
        return Rejection(Reject.GRAD_ENABLED)
    for flag, reason in _OUTPUT_FLAGS.items():
        if _flag(call, flag, target):
            return Rejection(reason)
    if call.extra:
        return Rejection(Reject.UNSUPPORTED_ARGUMENT, f"argument(s) {sorted(call.extra)}")
    problem = _input_problem(call, target) or _device_problem(call, target) or _shape_problem(call)
    if problem:
        return problem
    if (why := hf.unsupported_cache_reason(call.cache, target.cache_class)) is not None:
        return Rejection(Reject.UNSUPPORTED_CACHE, why)
    return None


def model_unsupported_reason(model: Any, config: Any, stack: nn.Module) -> str | None:
    """Why this model as a whole must stay eager (said once, in a warning), or None."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return "some weights are on the meta device (not loaded)"
    device_map = getattr(model, "hf_device_map", None) or {}
    placements = {str(v) for v in device_map.values()}
    if placements & {"cpu", "disk"}:
        return "accelerate offloads weights to cpu/disk; graphs need every weight resident on one GPU"
    if len(placements) > 1:
        return f"the model is split across devices {sorted(placements)}; bcg captures single-device models"
    if (flag := hf.BIASED_MASK_FLAGS.get(getattr(config, "model_type", ""))) and getattr(config, flag, False):
        return (f"{flag}=True: the stack folds position biases into the attention mask it builds, and bcg builds the "
                "masks without them")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_sets = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    if any(isinstance(r, dict) and r.get("rope_type", r.get("type")) in ("dynamic", "longrope") for r in rope_sets):
        return "dynamic RoPE recomputes frequencies from the sequence length at run time"
    implementation = hf.attention_implementation_of(config) or "eager"
    if implementation.startswith("paged"):
        return f"attention implementation '{implementation}' manages its own cache"
    missing = hf.missing_stack_arguments(stack)
    if missing and hf.attention_layers(config, getattr(config, "num_hidden_layers", 0) or 0) == 0:
        return ("an attention-free model (every layer a state-space mixer, as in Mamba): its stack takes no "
                f"{missing}, and bcg replays only stacks with attention")
    if missing == ["position_ids"]:
        return ("the stack's forward takes no position_ids (a design that predates them: it makes its positions "
                "itself, from the cache's length or as ALiBi biases), and bcg replays only stacks it can hand the "
                "tokens' positions")
    if missing:
        return (f"the stack's forward does not take {missing}, which bcg needs to replay it (a transformers "
                "version bcg does not know?)")
    return None


def uncovered_layers_reason(config: Any, break_layers: set[int]) -> str | None:
    """Why a model must stay eager: layers whose type says they keep mixer state, or whose type bcg does not know,
    with no module break found there."""
    if missing := [i for i in hf.layers_needing_breaks(config) if i not in break_layers]:
        types = sorted({config.layer_types[i] for i in missing})
        return (f"layers {missing} ({', '.join(types)}) are no plain attention, and running the stack once found no "
                "module there that bcg can run as a break of its own (one that received the cache and read or wrote "
                "it)")
    return None


def outside_interface_reason(stack: nn.Module, config: Any, num_layers: int, attention_layers: set[int]) -> str | None:
    """Why a model whose attention does not go through the AttentionInterface must stay eager: attention layers where
    running the stack once found no attention module that bcg can run as a break of its own (one that received the
    cache and updated its keys and values): their attention would be captured with the capture's mask."""
    if hf.uses_attention_interface(stack):
        return None
    if missing := [i for i in range(num_layers) if hf.runs_attention(config, i) and i not in attention_layers]:
        return (f"{type(stack).__name__}'s attention does not go through transformers' AttentionInterface, and running "
                f"the stack once found no attention module in layers {missing} that bcg can run as a break of its own "
                "(one that received the cache and updated its keys and values)")
    return None

"""transformers' models and stacks: verified range, signatures, layer types, generate()'s compile check, MoE experts."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from packaging.version import Version
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from .. import patching

# The oldest and the newest transformers bcg was verified on (CPU suite and GPU suite); pyproject.toml and the README
# state the same range (tests/test_compat.py checks). Outside it, wrap_model warns and verifies replays itself.
VERIFIED_TRANSFORMERS = ("5.17.0", "5.25.0")


def installed_transformers() -> str:
    import transformers  # at call time: transformers' lazy module may replace the object bound at bcg's import

    return transformers.__version__


def outside_verified_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies outside ``VERIFIED_TRANSFORMERS`` (a newer patch release
    of the newest verified minor counts as inside: patch releases do not rewrite internals)."""
    release = Version(version or installed_transformers()).release[:2]
    oldest, newest = (Version(v).release[:2] for v in VERIFIED_TRANSFORMERS)
    return not oldest <= release <= newest


# The KV cache's argument name, newest first: "cache" since 5.24, "past_key_values" before (and deprecated after).
CACHE_ARGUMENTS = ("cache", "past_key_values")
# What a stack forward must take for bcg to call it on static inputs and route a call's cache into the breaks.
REQUIRED_STACK_ARGUMENTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "use_cache")

# Layer types whose token mixer is attention through the AttentionInterface (what a break runs).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Layer types whose token mixer keeps per-sequence state in the cache (linear attention, SSM, short convolution);
# a "hybrid" layer runs such a mixer and attention, on one cache layer holding both.
STATEFUL_LAYER_TYPES = ("linear_attention", "conv", "hybrid")
# Config flags under which a model type's stack folds position biases into the attention mask it builds (Falcon's
# ALiBi): bcg builds the masks itself, without them.
BIASED_MASK_FLAGS = {"falcon": "alibi"}
_HYBRID_ATTENTION_MASKS = {"hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}
# Layers with neither attention nor mixer state (Nemotron-H's MLP layers; 5.17 gives them empty cache layers).
STATELESS_LAYER_TYPES = ("moe", "mlp")

# Llama's reference code, which fusion.py recognises in other models by bytecode.
LLAMA_RMS_NORM_FORWARD = modeling_llama.LlamaRMSNorm.forward
LLAMA_ROTARY = modeling_llama.apply_rotary_pos_emb
LLAMA_ROTATE_HALF = modeling_llama.rotate_half
LLAMA_MLP_FORWARD = modeling_llama.LlamaMLP.forward
# The function inside the wrappers that 5.25 puts around every layer's forward (gradient checkpointing, the deprecated
# ``past_key_values`` name): the wrappers' code is the same for every layer.
LLAMA_DECODER_LAYER_FORWARD = inspect.unwrap(modeling_llama.LlamaDecoderLayer.forward)
# Llama's attention forward (inside 5.24+'s deprecated-argument wrapper): q_proj, k_proj and v_proj called once each,
# in that order, on the same hidden states.
LLAMA_ATTENTION_FORWARD = inspect.unwrap(modeling_llama.LlamaAttention.forward)
# Qwen3's attention forward (inside 5.24+'s deprecated-argument wrapper): per-head q_norm / k_norm whose outputs go,
# transposed, to apply_rotary_pos_emb and nowhere else.
QWEN3_ATTENTION_FORWARD = inspect.unwrap(modeling_qwen3.Qwen3Attention.forward)
# What ``hidden_act="silu"`` builds (SiLUActivation in 5.x), and torch's own.
SILU_ACTIVATIONS = (type(ACT2FN["silu"]), nn.SiLU)


def plain_function(obj: Any) -> Callable | None:
    """The Python function behind a modeling file's function object: itself, or, for a kernelizable function (5.25+
    with the ``kernels`` package: ``@use_kernel_forward_from_hub`` turns it into a module object whose forward calls
    the function unless a kernel was mapped in), the function it wraps. None for anything else."""
    if inspect.isfunction(obj):
        return obj
    forward = getattr(type(obj), "forward", None)
    if getattr(type(obj), "kernel_layer_name", None) is None or not inspect.isfunction(forward):
        return None
    wrapped = [v for v in inspect.getclosurevars(forward).nonlocals.values() if inspect.isfunction(v)]
    return wrapped[0] if len(wrapped) == 1 else None


def is_pretrained_model(model: Any) -> bool:
    return isinstance(model, PreTrainedModel)


def decoder_of(model: nn.Module) -> nn.Module | None:
    return model.get_decoder() if hasattr(model, "get_decoder") else None


def num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether the model's attention goes through ``ALL_ATTENTION_FUNCTIONS`` (what bcg swaps for its breaks)."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    return can_set is None or bool(can_set())


def forward_parameters(forward: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(forward).parameters)


def cache_argument(forward: Callable, names: tuple[str, ...] = CACHE_ARGUMENTS) -> str | None:
    """The name under which ``forward`` takes the cache in the installed transformers, or None."""
    parameters = forward_parameters(forward)
    return next((name for name in names if name in parameters), None)


def code_names(code: Any) -> set[str]:
    """Every global and attribute name a code object (and the functions nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= code_names(const)
    return names


def layers_needing_breaks(config: Any) -> list[int]:
    """The layers that bcg replays only where running the stack once found a module break there (per
    ``layer_types``): those whose type says they hold mixer state, and those of a type bcg does not know (indexed,
    compressed or custom attention)."""
    plain = {*ATTENTION_LAYER_TYPES, *STATELESS_LAYER_TYPES}
    return [i for i, t in enumerate(getattr(config, "layer_types", None) or ()) if t not in plain]


def attention_layers(config: Any, num_layers: int) -> int:
    """How many of the stack's layers run plain attention (all of them, unless ``layer_types`` names others)."""
    return sum(runs_attention(config, i) for i in range(num_layers))


def runs_attention(config: Any, layer_idx: int) -> bool:
    """Whether a layer runs plain attention (every layer does, unless ``layer_types`` says otherwise)."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return True
    return layer_types[layer_idx] in ATTENTION_LAYER_TYPES or layer_types[layer_idx] in _HYBRID_ATTENTION_MASKS


def attention_mask_key(layer_type: str) -> str:
    """The key of an attention layer's mask among the masks transformers builds per layer type."""
    return _HYBRID_ATTENTION_MASKS.get(layer_type, layer_type)


def mixer_mask_key(layer_type: str) -> str:
    """The key of a stateful mixer's 2D padding mask among the per-layer-type masks ("conv" for LFM2's)."""
    return layer_type if layer_type == "conv" else "linear_attention"


# A layer's masks handed to its attention module in a dict of the stack's making (Zaya's): which mask each key holds
# ("attention": the layer's attention mask, "padding": its convolution's 2D padding mask, the mixers' mask).
MASK_DICT_ENTRIES = {"causal": "attention", "conv": "padding"}


def missing_stack_arguments(stack: nn.Module) -> list[str]:
    """Arguments bcg passes to (or reads from) a stack forward that this one does not take (a stack whose layers see
    positions only through its ALiBi biases needs no position_ids: a module break gets the biases made per call)."""
    parameters = forward_parameters(stack.forward)
    missing = [name for name in REQUIRED_STACK_ARGUMENTS if name not in parameters
               and not (name == "position_ids" and builds_alibi(stack))]
    if cache_argument(stack.forward) is None:
        missing.append(" or ".join(CACHE_ARGUMENTS))
    return missing


def builds_alibi(stack: nn.Module) -> bool:
    """The stack builds ALiBi biases from the padding mask for its layers (Bloom), its only source of positions."""
    return callable(getattr(stack, "build_alibi_tensor", None))


def stack_arguments(stack: nn.Module, padding_mask: torch.Tensor | None, cache: Any, batch: int, seq: int,
                    dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """What the stack computes per call and hands its layers, made by its own code for a call before any cache
    update (a module break takes them from here): Bloom's ALiBi biases, Inkling 2's relative distances (per attention
    mask key: a layer gets its attention type's). Empty for other stacks."""
    if builds_alibi(stack):
        return {"alibi": _alibi(stack, padding_mask, cache, batch, seq, dtype, device)}
    if (distance := _relative_distance_function(stack)) is not None:
        embeds = torch.empty((batch, seq, 0), dtype=dtype, device=device)  # what it reads: the length and the device
        return {"relative_distance": {"full_attention": distance(embeds, cache, is_sliding=False),
                                      "sliding_attention": distance(embeds, cache, is_sliding=True)}}
    return {}


def _alibi(stack: nn.Module, padding_mask: torch.Tensor | None, cache: Any, batch: int, seq: int,
           dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Bloom's ALiBi biases, over the 2D padding mask of past and new tokens (padded to a static cache's length, as
    its generate() pads it) or, without one, over every key position."""
    keys = cache.get_mask_sizes(seq, 0)[0] if cache is not None else seq
    if padding_mask is None:
        padding_mask = torch.ones(batch, keys, dtype=torch.long, device=device)
    padding_mask = torch.nn.functional.pad(padding_mask, (0, keys - padding_mask.shape[-1]))
    return stack.build_alibi_tensor(padding_mask, stack.num_heads, dtype)


def _relative_distance_function(stack: nn.Module) -> Callable | None:
    """The modeling file's ``get_relative_distance`` where the stack's forward calls it (Inkling 2: every query's
    distance to every key position, from the cache's mask sizes, for its full and its sliding attention layers)."""
    function = getattr(sys.modules[type(stack).__module__], "get_relative_distance", None)
    if function is None or "get_relative_distance" not in code_names(inspect.unwrap(type(stack).forward).__code__):
        return None
    return function


def kv_sharing(module: nn.Module) -> tuple[bool, bool]:
    """(reuses, stores): whether this attention module reads another layer's keys/values instead of updating the
    cache (Gemma 3n / Gemma 4), and whether its own post-update keys/values are what such layers read."""
    return bool(getattr(module, "is_kv_shared_layer", False)), bool(getattr(module, "store_full_length_kv", False))


_AUTO_COMPILE_CHECK = "_valid_auto_compile_criteria"


def _never_compile(*args: Any, **kwargs: Any) -> bool:
    return False


def prevent_auto_compile(model: PreTrainedModel) -> bool:
    """Keep ``generate()`` from compiling the forward (it does for static caches): bcg's graphs must not be traced.

    Shadows the model's compile check on the instance instead of writing ``generation_config``, so nothing reaches
    ``save_pretrained`` (and copies drop it). Returns False when this transformers has no such check.
    """
    if not hasattr(type(model), _AUTO_COMPILE_CHECK):
        return False
    patching.patch(model, _AUTO_COMPILE_CHECK, _never_compile)
    return True


def allow_auto_compile(model: PreTrainedModel) -> None:
    if patching.is_patched(model, _AUTO_COMPILE_CHECK):
        delattr(model, _AUTO_COMPILE_CHECK)


def use_capturable_experts(model: PreTrainedModel) -> str | None:
    """Switch MoE experts from the eager loop (which syncs on ``nonzero``) to ``grouped_mm``; return what it was."""
    if getattr(model.config, "_experts_implementation", None) != "eager" or not hasattr(
            model, "set_experts_implementation"):
        return None
    saved = model.get_experts_implementation()
    model.set_experts_implementation("grouped_mm")
    return saved


def has_switchable_experts(model: PreTrainedModel) -> bool:
    """Whether the model's MoE experts run an implementation chosen at run time (generate() switches it)."""
    check = getattr(type(model), "_can_set_experts_implementation", None)
    return bool(check()) if callable(check) else False


def experts_implementation(config: Any) -> str | None:
    """The experts implementation the stack runs now (generate() switches grouped_mm to batched_mm for decode)."""
    return getattr(config, "_experts_implementation", None)


def set_experts_implementation(model: PreTrainedModel, implementation: Any) -> None:
    model.set_experts_implementation(implementation)


@contextmanager
def experts_running(module: nn.Module, implementation: str | None) -> Iterator[None]:
    """The stack's MoE experts run ``implementation`` for the duration (None: as they are)."""
    current = experts_implementation(getattr(module, "config", None))
    if implementation is None or current == implementation or not hasattr(module, "set_experts_implementation"):
        yield
        return
    module.set_experts_implementation(implementation)
    try:
        yield
    finally:
        module.set_experts_implementation(current)

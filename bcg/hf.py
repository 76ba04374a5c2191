"""Every transformers internal bcg touches, in one place.

transformers moves its internals monthly (5.24 renamed the stack's, the layers' and the attention modules'
``past_key_values`` argument to ``cache``; 5.25 moved the hybrids' convolution state into a new function), so names are
read from the installed version's own signatures wherever they can be, state is found by walking it, and no other bcg
module imports transformers. ``VERIFIED_TRANSFORMERS`` is the range bcg was verified on; outside it, bcg verifies its
replays against eager itself (verify.py).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
import transformers
from packaging.version import Version
from transformers import AttentionInterface, PreTrainedModel, cache_utils
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)
from transformers.integrations import sdpa_attention
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_masks_for_generate
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from . import patching

# The oldest and the newest transformers bcg was verified on (CPU suite and GPU suite); pyproject.toml and the README
# state the same range (tests/test_compat.py checks). Outside it, wrap_model warns and verifies replays itself.
VERIFIED_TRANSFORMERS = ("5.17.0", "5.25.0")


def installed_transformers() -> str:
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
# a "hybrid" layer runs such a mixer and attention, on one cache layer holding both. Not "hybrid_sliding" (Inkling):
# transformers' mask table gives its attention a full causal mask where the model applies its window.
STATEFUL_LAYER_TYPES = ("linear_attention", "conv", "hybrid")
_HYBRID_ATTENTION_MASKS = {"hybrid": "full_attention"}
# Layers with neither attention nor mixer state (Nemotron-H's MLP layers; 5.17 gives them empty cache layers).
_STATELESS_LAYER_TYPES = ("moe", "mlp")
SUPPORTED_CACHES = (DynamicCache, StaticCache)
# DummyLayer (5.24+) holds the slot of a layer that reads another layer's keys/values and is never updated;
# LinearAttentionCacheLayerMixin layers hold a mixer's convolution / recurrent state (the mixer updates it itself).
_SUPPORTED_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer,
                           *([cache_utils.DummyLayer] if hasattr(cache_utils, "DummyLayer") else []),
                           *([cache_utils.LinearAttentionCacheLayerMixin]
                             if hasattr(cache_utils, "LinearAttentionCacheLayerMixin") else []))
# The argument a stateful mixer takes its cache under: 5.24 "cache"; 5.17 "cache_params" or "past_key_values".
MIXER_CACHE_ARGUMENTS = ("cache", "cache_params", "past_key_values")

# Llama's reference code, which fusion.py recognises in other models by bytecode.
LLAMA_RMS_NORM_FORWARD = modeling_llama.LlamaRMSNorm.forward
LLAMA_ROTARY = modeling_llama.apply_rotary_pos_emb
LLAMA_ROTATE_HALF = modeling_llama.rotate_half


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


# ----- models and stacks -----
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


def mixer_cache_argument(mixer: nn.Module) -> str | None:
    """The name under which a stateful mixer's class forward takes the cache (an instance hook may hide it)."""
    return cache_argument(type(mixer).forward, MIXER_CACHE_ARGUMENTS)


def _code_names(code: Any) -> set[str]:
    """Every global and attribute name a code object (and the functions nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


def stateful_layer_indices(config: Any) -> list[int]:
    """The layers whose type says they hold mixer state (per ``layer_types``)."""
    return [i for i, t in enumerate(getattr(config, "layer_types", None) or ()) if t in STATEFUL_LAYER_TYPES]


def unknown_layer_types(config: Any) -> set[str]:
    """Layer types that are neither attention, nor a stateful mixer, nor a stateless placeholder."""
    known = {*ATTENTION_LAYER_TYPES, *STATEFUL_LAYER_TYPES, *_STATELESS_LAYER_TYPES}
    return set(getattr(config, "layer_types", None) or ()) - known


def attention_layers(config: Any, num_layers: int) -> int:
    """How many of the stack's layers run attention (all of them, unless ``layer_types`` names mixer-only ones)."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return num_layers
    return sum(t in ATTENTION_LAYER_TYPES or t in _HYBRID_ATTENTION_MASKS for t in layer_types)


def attention_mask_key(layer_type: str) -> str:
    """The key of an attention layer's mask among the masks transformers builds per layer type."""
    return _HYBRID_ATTENTION_MASKS.get(layer_type, layer_type)


def mixer_mask_key(layer_type: str) -> str:
    """The key of a stateful mixer's 2D padding mask among the per-layer-type masks ("conv" for LFM2's)."""
    return layer_type if layer_type == "conv" else "linear_attention"


def missing_stack_arguments(forward: Callable) -> list[str]:
    """Arguments bcg passes to (or reads from) a stack forward that this one does not take."""
    parameters = forward_parameters(forward)
    missing = [name for name in REQUIRED_STACK_ARGUMENTS if name not in parameters]
    if cache_argument(forward) is None:
        missing.append(" or ".join(CACHE_ARGUMENTS))
    return missing


def caches_latents(config: Any) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3, LongCat, ...) caches compressed latents, not the keys/values it
    hands to the attention function: a break would fill the cache with something else than the model does."""
    return getattr(config, "kv_lora_rank", None) is not None


def kv_sharing(module: nn.Module) -> tuple[bool, bool]:
    """(reuses, stores): whether this attention module reads another layer's keys/values instead of updating the
    cache (Gemma 3n / Gemma 4), and whether its own post-update keys/values are what such layers read."""
    return bool(getattr(module, "is_kv_shared_layer", False)), bool(getattr(module, "store_full_length_kv", False))


def output_with_cache(output_cls: type, hidden: torch.Tensor, cache: Any) -> Any:
    """The stack's own output class holding ``hidden`` and the live cache, under whichever field name it uses."""
    names = {field.name for field in dataclasses.fields(output_cls)}
    cache_field = next((name for name in CACHE_ARGUMENTS if name in names), None)
    return output_cls(last_hidden_state=hidden, **({cache_field: cache} if cache_field else {}))


def cache_of(output: Any) -> Any:
    """The cache a stack output holds, under whichever field name it uses (None if none)."""
    return next((getattr(output, name) for name in CACHE_ARGUMENTS if getattr(output, name, None) is not None), None)


# ----- caches -----
def cache_state(cache: Any) -> dict[str, Any]:
    """Every tensor and plain value (number, flag) a cache holds, by path ("layers.3.conv_states.0", "linear_cache.1"):
    what a call changes, walked rather than named so that state a transformers release adds is covered too."""
    state: dict[str, Any] = {}
    if cache is None:
        return state
    for i, layer in enumerate(getattr(cache, "layers", ())):
        _walk(vars(layer), f"layers.{i}", state)
    _walk({k: v for k, v in vars(cache).items() if k != "layers"}, "cache", state)
    return state


def _walk(values: dict, prefix: str, state: dict[str, Any], depth: int = 2) -> None:
    for name, value in values.items():
        path = f"{prefix}.{name}"
        if isinstance(value, torch.Tensor) or (isinstance(value, (bool, int, float)) and not isinstance(value, type)):
            state[path] = value
        elif isinstance(value, (dict, list, tuple)) and depth > 0:
            _walk(dict(value.items() if isinstance(value, dict) else enumerate(value)), path, state, depth - 1)


def copy_cache(cache: Any) -> Any:
    """A deep copy of ``cache`` whose tensors are compact clones (a view of a large stand-in copies only the view)."""
    if cache is None:
        return None
    with torch.inference_mode(False):
        memo = {id(t): t.clone() for t in cache_state(cache).values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(cache, memo)


def stack_cache_class(stack_forward: Callable) -> type:
    """The cache class a stack makes for itself: the DynamicCache subclass its cache argument is annotated with
    (MiniMax's MiniMaxCache, which holds its mixers' state), else DynamicCache."""
    name = cache_argument(stack_forward)
    annotation = forward_parameters(stack_forward)[name].annotation if name else None
    if isinstance(annotation, str):  # a modeling file with postponed annotations
        try:
            annotation = typing.get_type_hints(inspect.unwrap(stack_forward)).get(name)
        except Exception:  # an annotation that does not resolve says nothing about the cache
            annotation = None
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, DynamicCache):
            return candidate
    return DynamicCache


def new_cache(cache_class: type, config: Any) -> DynamicCache:
    """The cache a stack creates for itself when called with ``use_cache`` and no cache."""
    if "config" in forward_parameters(cache_class.__init__):
        return cache_class(config=config)
    return cache_class()


def unsupported_cache_reason(cache: Any, own_class: type = DynamicCache) -> str | None:
    """Why the breaks cannot update ``cache`` in place of the model, naming the class; None when they can.
    ``own_class``: the cache class the model makes for itself (supported: a DynamicCache subclass by construction)."""
    if cache is None:
        return None
    if own_class is not DynamicCache and type(cache) is not own_class:
        return f"cache class {type(cache).__name__} (this model keeps state in a {own_class.__name__} of its own)"
    if type(cache) not in SUPPORTED_CACHES and type(cache) is not own_class:
        return f"cache class {type(cache).__name__} (supported: DynamicCache, StaticCache)"
    if getattr(cache, "offloading", False):
        return f"an offloading {type(cache).__name__}"
    layers = [type(layer).__name__ for layer in getattr(cache, "layers", ())
              if not isinstance(layer, _SUPPORTED_CACHE_LAYERS)]
    if layers:
        return (f"cache layer classes {sorted(set(layers))} (supported: full and sliding, dynamic and static, and "
                "the linear-attention layers holding a mixer's state)")
    return None


def past_length(cache: Any) -> int | torch.Tensor:
    return cache.get_seq_length() if cache is not None else 0


def update_cache(cache: Any, keys: torch.Tensor, values: torch.Tensor,
                 layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.update(keys, values, layer_idx)


def static_layers(cache: Any, new_tokens: int = 0) -> list | None:
    """The layers of a StaticCache whose every layer is a static layer, full or sliding, allocated already; None for
    any other cache. ``new_tokens`` > 0: only when a step of that many tokens per sequence updates nothing but tensors
    at fixed addresses (keys, values, a length counter), so it can be one graph: every sliding layer has room for them
    still (a full sliding layer rolls its window instead: its Python-side length picks that path, and the roll builds
    an index on the host)."""
    if type(cache) is not StaticCache or getattr(cache, "offloading", False):
        return None
    layers = list(cache.layers)
    if not layers or not all(_static_and_in_place(layer, new_tokens) for layer in layers):
        return None
    return layers


def _static_and_in_place(layer: Any, new_tokens: int) -> bool:
    kind = type(layer)
    if kind is StaticLayer:
        return layer.is_initialized
    return (kind is StaticSlidingWindowLayer and layer.is_initialized
            and (new_tokens == 0 or layer.cumulative_length_int + new_tokens <= layer.max_cache_len))


def _sliding_static(layers: Any) -> list:
    return [layer for layer in layers if type(layer) is StaticSlidingWindowLayer]


def host_lengths(layers: list) -> list[tuple[Any, int]]:
    """The sliding layers among static ``layers`` with the token count each keeps in Python beside its length tensor
    (a graph's replay advances the tensor, not this count)."""
    return [(layer, layer.cumulative_length_int) for layer in _sliding_static(layers)]


def set_host_lengths(held: list[tuple[Any, int]], added: int) -> None:
    """Set each layer's Python-side token count to the one held plus ``added``."""
    for layer, length in held:
        layer.cumulative_length_int = length + added


@contextmanager
def sliding_lengths_as_tensors(cache: Any) -> Iterator[None]:
    """While a graph is captured: sliding static layers report their length tensor from ``get_seq_length``, as full
    static layers do. Masks take their query offset from it; the Python count a sliding layer reports otherwise would
    stay the capture step's in every replay (a query at position 9 for ever: it never sees the keys it writes after).
    The tensor equals the count while the layer has room, the only case a full graph runs."""
    sliding = _sliding_static(getattr(cache, "layers", ()))
    for layer in sliding:
        layer.get_seq_length = lambda layer=layer: layer.cumulative_length
    try:
        yield
    finally:
        for layer in sliding:
            del layer.get_seq_length


def static_layer_tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, length counter) of a static cache layer, full or sliding."""
    return layer.keys, layer.values, layer.cumulative_length


def rebind_static_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor) -> None:
    """Point a static cache layer at other tensors of the same shapes (what it held must be copied first)."""
    layer.keys, layer.values, layer.cumulative_length = keys, values, length


def full_dynamic_layers(cache: Any) -> list | None:
    """The layers of a cache whose every layer is a plain (not sliding) dynamic layer holding keys and values of the
    same length; None for any other cache."""
    layers = list(getattr(cache, "layers", None) or ())
    if not layers or getattr(cache, "offloading", False) or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    keys = [getattr(layer, "keys", None) for layer in layers]
    if not all(isinstance(k, torch.Tensor) and k.ndim == 4 for k in keys) or len({k.shape[-2] for k in keys}) != 1:
        return None
    return layers


def dynamic_layer_tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys, layer.values


def rebind_dynamic_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values


def makes_full_static_caches(config: Any) -> bool:
    """Whether a StaticCache made from ``config`` has full static layers only (no sliding window, no mixer state)."""
    try:
        layers = StaticCache(config=config, max_cache_len=1).layers
    except Exception:  # a config transformers cannot build a static cache from: no stand-ins, the breaks serve
        return False
    return bool(layers) and all(type(layer) is StaticLayer for layer in layers)


def static_cache_like(config: Any, layers: list, max_cache_len: int) -> tuple[Any, tuple | None] | None:
    """A StaticCache of ``max_cache_len`` positions, allocated for the batch, heads and dtypes of ``layers`` (a
    dynamic cache's), or None when the config does not make every layer a full static one. When the layers' shapes
    agree, every layer's keys (values) are slices of one tensor, returned beside the cache (else None)."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(cache.layers) != len(layers) or any(type(layer) is not StaticLayer for layer in cache.layers):
        return None
    shapes = {(layer.keys.shape[:2], layer.keys.shape[-1], layer.values.shape[-1], layer.keys.dtype,
               layer.values.dtype) for layer in layers}
    stacked = None
    if len(shapes) == 1:
        keys, values = layers[0].keys, layers[0].values
        stacked = tuple(t.new_zeros(len(layers), *t.shape[:2], max_cache_len, t.shape[-1]) for t in (keys, values))
    for i, (static, dynamic) in enumerate(zip(cache.layers, layers)):
        static.lazy_initialization(dynamic.keys, dynamic.values)
        if stacked is not None:  # the layer's own allocation goes at once: at most one layer's worth extra
            rebind_static_layer(static, stacked[0][i], stacked[1][i], static.cumulative_length)
    return cache, stacked


_LINEAR_LAYER = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
# A hybrid cache layer's attention part: the break updates it eagerly (dynamic keys/values grow by reassignment).
_ATTENTION_STATE_NAMES = frozenset({"keys", "values", "cumulative_length"})
MixerStateName = tuple[str, Any]  # (attribute of the cache layer, key within it or None)


def _mixer_layer_tensors(layer: Any) -> Iterator[tuple[MixerStateName, torch.Tensor]]:
    """Every tensor a mixer's cache layer holds, directly or in a dict / list attribute, except its attention part's:
    the convolution and recurrent states and whatever else a transformers release adds (5.25 added a token counter the
    decode step advances in place). Found by walking the layer, not by a list of names."""
    for attribute, value in vars(layer).items():
        if attribute in _ATTENTION_STATE_NAMES:
            continue
        if isinstance(value, torch.Tensor):
            yield (attribute, None), value
        elif isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            yield from (((attribute, key), t) for key, t in items if isinstance(t, torch.Tensor))


def settled_mixer_states(cache: Any, layer_idx: int) -> dict[MixerStateName, torch.Tensor] | None:
    """A mixer's cache-layer tensors, by name, when a decode step updates them in place: every state allocated, a
    previous step recorded, no past being recorded (transformers copies into these tensors "to keep the static address"
    then). None otherwise: a prefill, a first step, speculative rollback, another cache layer."""
    layers = getattr(cache, "layers", None)
    if _LINEAR_LAYER is None or layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if not isinstance(layer, _LINEAR_LAYER) or layer.record_past or getattr(cache, "offloading", False):
        return None
    if not all(layer.has_previous_state[i] for i in range(layer.number_of_states)):
        return None
    return dict(_mixer_layer_tensors(layer)) or None


def mixer_state(cache: Any, layer_idx: int, name: MixerStateName) -> Any:
    """One of a mixer's cache-layer tensors by name, whatever the layer's condition (None if absent)."""
    attribute, key = name
    value = getattr(cache.layers[layer_idx], attribute, None)
    if key is None or value is None:
        return value
    return value.get(key) if isinstance(value, dict) else value[key]


def rebind_mixer_state(cache: Any, layer_idx: int, name: MixerStateName, tensor: torch.Tensor) -> None:
    """Point one of a mixer's cache-layer tensors at another of its shape (its contents copied first)."""
    attribute, key = name
    layer = cache.layers[layer_idx]
    if key is None:
        setattr(layer, attribute, tensor)
    else:
        getattr(layer, attribute)[key] = tensor


# ----- masks -----
_MASK_CACHE_ARGUMENT = cache_argument(create_masks_for_generate)
# transformers 5.17's create_chunked_causal_mask does not take the block_sequence_ids that create_masks_for_generate
# passes to every layer type's function (Llama 4 failed there): such versions get the per-type calls made here, as do
# configs with MLP-only layer types (for which create_masks_for_generate hands back the raw 2D mask).
_MASK_FUNCTIONS_TAKE_ALL = all(
    "block_sequence_ids" in forward_parameters(LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[t]) for t in ATTENTION_LAYER_TYPES
)


def builds_full_masks_only(config: Any, stack_forward: Callable) -> bool:
    """The stack builds plain causal masks although its config names a sliding window (Moshi): transformers' generic
    builder would apply the window, so bcg must build what the stack's own code calls."""
    if getattr(config, "layer_types", None) or getattr(config, "sliding_window", None) is None:
        return False
    names = _code_names(inspect.unwrap(stack_forward).__code__)
    return "create_causal_mask" in names and "create_sliding_window_causal_mask" not in names


def mask_windows(config: Any, full_only: bool = False) -> dict[str, int | None]:
    """The sliding window (None: plain causal) of the mask ``create_masks`` builds under each attention mask key; a
    key whose mask is something else (chunked, bidirectional, a mixer's) is left out."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if full_only:
        return {"full_attention": None}
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:  # one mask for every layer: sliding when the config names a window (create_masks_for_generate)
        chunked = window is None and getattr(text, "attention_chunk_size", None) is not None
        return {} if chunked else {"full_attention": window}
    keys = {attention_mask_key(t) for t in layer_types}
    return {key: w for key, w in (("full_attention", None), ("sliding_attention", window)) if key in keys}


def create_masks(config: Any, attention_mask: Any, cache: Any, position_ids: torch.Tensor, batch: int, seq: int,
                 dtype: torch.dtype, device: torch.device, full_only: bool = False) -> torch.Tensor | dict | None:
    """transformers' own per-layer-type masks for a call, as the model would build them (``config`` carries the
    model's original attention implementation; ``full_only``: see ``builds_full_masks_only``)."""
    kwargs = dict(config=config, inputs_embeds=torch.empty((batch, seq, 0), dtype=dtype, device=device),
                  attention_mask=attention_mask, position_ids=position_ids, **{_MASK_CACHE_ARGUMENT: cache})
    if full_only:
        function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING["full_attention"]
        return {"full_attention": function(**{k: v for k, v in kwargs.items() if k in forward_parameters(function)})}
    all_types = set(getattr(config.get_text_config(), "layer_types", None) or ())
    layer_types = all_types - set(_STATELESS_LAYER_TYPES)  # MLP-only layers (Nemotron-H) take no mask
    per_type = not _MASK_FUNCTIONS_TAKE_ALL or layer_types != all_types
    if not per_type or not layer_types or not layer_types <= set(LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING):
        return create_masks_for_generate(**kwargs)
    kwargs["config"] = config.get_text_config()
    functions = {}
    for layer_type in layer_types:  # a hybrid layer's entry holds its attention's and its mixer's functions
        function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[layer_type]
        functions.update(function if isinstance(function, dict) else {layer_type: function})
    return {t: f(**{k: v for k, v in kwargs.items() if k in forward_parameters(f)}) for t, f in functions.items()}


# Implementations whose mask functions are plain tensor code on a static cache's decode step (no host read, no skip:
# transformers keeps the mask for compileable caches), so a full decode graph can build the masks inside itself.
_MASKS_BUILT_IN_GRAPHS = frozenset({"sdpa", "eager"})


def masks_build_in_graphs(config: Any) -> bool:
    return attention_implementation_of(config) in _MASKS_BUILT_IN_GRAPHS


# ----- attention functions -----
def register_attention(name: str, function: Callable) -> None:
    AttentionInterface.register(name, function)


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


# ----- generate() and experts -----
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


def set_experts_implementation(model: PreTrainedModel, implementation: Any) -> None:
    model.set_experts_implementation(implementation)

"""transformers' caches: which ones the breaks can update, static layers, mixer state, and a cache's whole state."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import cache_utils
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from .models import CACHE_ARGUMENTS, cache_argument, forward_parameters

SUPPORTED_CACHES = (DynamicCache, StaticCache)
# Indexed layers (DeepSeek-V3.2's, GLM-MoE-DSA's sparse attention; 5.17+): keys and values, and the indexer's keys.
_STATIC_INDEXED_LAYER = getattr(cache_utils, "StaticIndexedLayer", None)
_DYNAMIC_INDEXED_LAYER = getattr(cache_utils, "DynamicIndexedLayer", None)
# DummyLayer (5.24+) holds the slot of a layer that reads another layer's keys/values and is never updated;
# LinearAttentionCacheLayerMixin layers hold a mixer's convolution / recurrent state (the mixer updates it itself).
_SUPPORTED_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer,
                           *([cache_utils.DummyLayer] if hasattr(cache_utils, "DummyLayer") else []),
                           *([cache_utils.LinearAttentionCacheLayerMixin]
                             if hasattr(cache_utils, "LinearAttentionCacheLayerMixin") else []))


def output_with_cache(output_cls: type, hidden: torch.Tensor, cache: Any) -> Any:
    """The stack's own output class holding ``hidden`` and the live cache, under whichever field name it uses."""
    return _output_maker(output_cls)(hidden, cache)


@functools.cache
def _output_maker(output_cls: type) -> Callable[[torch.Tensor, Any], Any]:
    """How to make ``output_cls`` outputs: filled in directly where that gives what its constructor gives (checked once
    per class), else by its constructor. transformers' ModelOutput recomputes its dataclass fields on every attribute
    it sets: 20-30 µs a decode step, a tenth of bcg's host time per step."""
    cache_field = _cache_field(output_cls)
    names = [field.name for field in dataclasses.fields(output_cls)]

    def construct(hidden: torch.Tensor, cache: Any) -> Any:
        return output_cls(last_hidden_state=hidden, **({cache_field: cache} if cache_field else {}))

    def fill(hidden: torch.Tensor, cache: Any) -> Any:
        # a ModelOutput is an OrderedDict of its fields that are set, mirrored by attributes (all fields)
        output = output_cls.__new__(output_cls)
        values = {"last_hidden_state": hidden, cache_field: cache}
        for name in names:
            value = values.get(name)
            if value is not None:
                OrderedDict.__setitem__(output, name, value)
            object.__setattr__(output, name, value)
        return output

    probe, cache = torch.zeros(1), DynamicCache()
    return fill if _same_output(fill(probe, cache), construct(probe, cache)) else construct


def _same_output(made: Any, constructed: Any) -> bool:
    """The same class, and the same items and attributes, in order and by identity."""
    def same(a: dict, b: dict) -> bool:
        return list(a) == list(b) and all(a[k] is b[k] for k in a)

    same_attributes = same(vars(made), vars(constructed))
    return type(made) is type(constructed) and same(dict(made), dict(constructed)) and same_attributes


@functools.cache
def _cache_field(output_cls: type) -> str | None:
    names = {field.name for field in dataclasses.fields(output_cls)}
    return next((name for name in CACHE_ARGUMENTS if name in names), None)


def cache_of(output: Any) -> Any:
    """The cache a stack output holds, under whichever field name it uses (None if none)."""
    return next((getattr(output, name) for name in CACHE_ARGUMENTS if getattr(output, name, None) is not None), None)



def cache_state(cache: Any) -> dict[str, Any]:
    """Every tensor and plain value (number, flag) a cache holds, by path ("layers.3.conv_states.0", "linear_cache.1"):
    what a call changes, walked rather than named so that state a transformers release adds is covered too."""
    state: dict[str, Any] = {}
    if cache is None:
        return state
    for i, layer in enumerate(getattr(cache, "layers", ())):
        _walk(_plain_vars(layer), f"layers.{i}", state)
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
        state = cache_state(cache)  # alive until the copy is made: the memo goes by its tensors' ids
        memo = {id(t): t.clone() for t in state.values() if isinstance(t, torch.Tensor)}
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
    # one check per layer class, not per layer: every decode step asks
    unsupported = [kind.__name__ for kind in {type(layer) for layer in getattr(cache, "layers", ())}
                   if not issubclass(kind, _SUPPORTED_CACHE_LAYERS)]
    if unsupported:
        return (f"cache layer classes {sorted(unsupported)} (supported: full and sliding, dynamic and static, and "
                "the linear-attention layers holding a mixer's state)")
    return None


def holds_indexer_keys(cache: Any) -> bool:
    """Whether some layer of ``cache`` keeps an indexer's keys (indexed / sparse attention)."""
    return any(getattr(layer, "is_indexer_initialized", False) for layer in getattr(cache, "layers", ()))


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
    if kind is _STATIC_INDEXED_LAYER:  # indexer positions, where a model records them, are set per call
        return layer.is_initialized and getattr(layer, "indexer_position_ids", None) is None
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


StaticState = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # (buffers, length counters)
# An indexed layer (DeepSeek-V3.2's, GLM-MoE-DSA's sparse attention, 5.25+) holds its indexer's keys and their own
# length counter beside the keys and values.
_INDEXER_STATE = ("indexer_keys", "indexer_cumulative_length")


def static_layer_state(layer: Any) -> StaticState:
    """Every tensor a static cache layer holds, full, sliding or indexed: its buffers (keys, values, and an indexed
    layer's indexer keys) and their length counters, in one order."""
    # a layer that reuses another layer's selection keeps no indexer keys
    if type(layer) is _STATIC_INDEXED_LAYER and layer.is_indexer_initialized:
        buffers = (layer.keys, layer.values, layer.indexer_keys)
        return buffers, (layer.cumulative_length, layer.indexer_cumulative_length)
    return (layer.keys, layer.values), (layer.cumulative_length,)


def rebind_static_layer(layer: Any, buffers: tuple[torch.Tensor, ...], counters: tuple[torch.Tensor, ...]) -> None:
    """Point a static cache layer at other tensors of the same shapes (what it held must be copied first)."""
    layer.keys, layer.values, layer.cumulative_length = buffers[0], buffers[1], counters[0]
    if len(buffers) > 2:
        layer.indexer_keys, layer.indexer_cumulative_length = buffers[2], counters[1]


def static_layer_tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, length counter) of a static cache layer."""
    (keys, values, *_), (length, *_) = static_layer_state(layer)
    return keys, values, length


# What a dynamic layer holds per position, in the order of a static layer's buffers (static_layer_state): every tensor
# has its positions on dimension -2 (keys and values [B, H, T, D], an indexed layer's indexer keys [B, T, D]).
_KEYS_AND_VALUES = ("keys", "values")
_INDEXED = (*_KEYS_AND_VALUES, "indexer_keys")


def _dynamic_names(layer: Any) -> tuple[str, ...]:
    """The attributes holding a dynamic layer's per-position tensors: an indexed layer's indexer keys too, once its
    indexer ran (a layer reusing another layer's selection keeps none)."""
    return _INDEXED if getattr(layer, "is_indexer_initialized", False) else _KEYS_AND_VALUES


def dynamic_layer_tensors(layer: Any) -> tuple[Any, ...]:
    """A dynamic layer's keys and values, and an indexed layer's indexer keys where it keeps them (None for one it
    lacks)."""
    return tuple(getattr(layer, name, None) for name in _dynamic_names(layer))


def rebind_dynamic_layer(layer: Any, tensors: tuple[torch.Tensor, ...]) -> None:
    """Give a dynamic layer other tensors, in ``dynamic_layer_tensors``' order."""
    for name, tensor in zip(_dynamic_names(layer), tensors, strict=True):
        setattr(layer, name, tensor)


def full_dynamic_layers(cache: Any) -> list | None:
    """The layers of a cache whose every layer is a plain (not sliding) dynamic layer, or an indexed one whose
    positions the model does not record per call, holding tensors of one length (an indexed layer's indexer keys
    too); None for any other cache."""
    layers = list(getattr(cache, "layers", None) or ())
    if (not layers or getattr(cache, "offloading", False)
            or any(type(layer) not in _STATIC_LAYER_FOR for layer in layers)
            or any(getattr(layer, "indexer_position_ids", None) is not None for layer in layers)):
        return None
    lengths = set()
    for layer in layers:
        tensors = dynamic_layer_tensors(layer)
        if not all(isinstance(t, torch.Tensor) and t.ndim == ndim for t, ndim in zip(tensors, (4, 4, 3))):
            return None
        lengths.update(t.shape[-2] for t in tensors)
    return layers if len(lengths) == 1 else None


def _viewed(which: int) -> property:
    """A StandInLayer's attribute ``_INDEXED[which]``: read, a view of the stand-in; assigned, the layer holds its own
    tensors again."""
    name = _INDEXED[which]

    def read(layer: StandInLayer) -> torch.Tensor | None:
        return layer._bcg_source.view(which, layer._bcg_index)

    def assign(layer: StandInLayer, tensor: torch.Tensor | None) -> None:
        _hold(layer, {name: tensor})

    return property(read, assign)


class StandInLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are a static stand-in's first ``length`` positions (stand_ins.py), viewed
    when read: a decode step then moves the stand-in's one count instead of giving every layer two new views (56
    views took ~85 µs of an H100 host's time per step at 28 layers). Assigning its keys or values (an update, a crop,
    a reorder) makes it a plain DynamicLayer holding its own tensors again; a copy or a pickle of it is one."""

    _bcg_plain: type = DynamicLayer  # the class it becomes again
    _bcg_viewed: tuple[str, ...] = _KEYS_AND_VALUES  # its attributes read from the stand-in, by ``view``'s index
    _bcg_source: Any  # the stand-in: its ``length`` and ``view(which, index)``
    _bcg_index: int
    keys, values = _viewed(0), _viewed(1)

    def get_seq_length(self) -> int:
        return self._bcg_source.length

    def __deepcopy__(self, memo: dict) -> DynamicLayer:
        """A plain layer holding compact copies (not a copy of the whole stand-in)."""
        plain = memo[id(self)] = _plain_layer(self._bcg_plain, {})
        plain.__dict__.update({name: value if name in self._bcg_viewed else copy.deepcopy(value, memo)
                               for name, value in self._compact_state().items()})
        return plain

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _plain_layer, (self._bcg_plain, self._compact_state())

    def _compact_state(self) -> dict[str, Any]:
        return {**_plain_vars(self), **_copies(self)}


# Per full-attention dynamic layer class a stand-in serves: the class its layers take while they read one, and the
# static layer class standing in for it
_STAND_INS: dict[type, tuple[type, type]] = {DynamicLayer: (StandInLayer, StaticLayer)}

if _DYNAMIC_INDEXED_LAYER is not None:
    class StandInIndexedLayer(StandInLayer, _DYNAMIC_INDEXED_LAYER):
        """An indexed dynamic layer reading a stand-in: its indexer keys too (None where the stand-in's layer keeps
        none: a layer reusing another's selection)."""

        _bcg_plain = _DYNAMIC_INDEXED_LAYER
        _bcg_viewed = _INDEXED
        indexer_keys = _viewed(2)

    _STAND_INS[_DYNAMIC_INDEXED_LAYER] = (StandInIndexedLayer, _STATIC_INDEXED_LAYER)

_STAND_IN_CLASSES = frozenset(reading for reading, _ in _STAND_INS.values())
_STATIC_LAYER_FOR = {kind: static for plain, (reading, static) in _STAND_INS.items() for kind in (plain, reading)}


def _plain_layer(cls: type, state: dict[str, Any]) -> DynamicLayer:
    layer = cls.__new__(cls)
    layer.__dict__.update(state)
    return layer


def _copies(layer: StandInLayer) -> dict[str, torch.Tensor | None]:
    """Compact copies of what a StandInLayer shows."""
    return {name: None if (t := getattr(layer, name)) is None else t.clone() for name in layer._bcg_viewed}


def _hold(layer: StandInLayer, given: dict[str, torch.Tensor | None]) -> None:
    """A StandInLayer becomes a plain layer again, holding ``given`` and, for the rest of what it showed, views of the
    stand-in (those a step replaces next, or a hand-back copies)."""
    held = {name: given[name] if name in given else getattr(layer, name) for name in layer._bcg_viewed}
    plain = layer._bcg_plain
    del layer._bcg_source, layer._bcg_index
    layer.__class__ = plain
    for name, tensor in held.items():
        setattr(layer, name, tensor)


def read_from(layer: Any, source: Any, index: int) -> None:
    """A plain dynamic layer (or one reading another stand-in) reads its keys and values (an indexed layer's indexer
    keys too) from ``source``'s layer ``index`` from now on (its own tensors go: their contents must be in the
    stand-in already)."""
    if type(layer) in _STAND_INS:
        reading = _STAND_INS[type(layer)][0]
        for name in reading._bcg_viewed:
            layer.__dict__.pop(name, None)
        layer.__class__ = reading
    layer._bcg_source, layer._bcg_index = source, index


def reads_from(layer: Any, source: Any) -> bool:
    return type(layer) in _STAND_IN_CLASSES and layer._bcg_source is source


def all_read_from(layers: list, source: Any) -> bool:
    """Whether every layer reads ``source`` (one loop, no call per layer: a decode step asks it before replaying)."""
    return all(type(layer) in _STAND_IN_CLASSES and layer._bcg_source is source for layer in layers)


def hold_copies(layer: StandInLayer) -> None:
    """The layer gets copies of what it shows: the stand-in goes to another cache, or away."""
    _hold(layer, _copies(layer))


def _plain_vars(layer: Any) -> dict[str, Any]:
    """A layer's attributes as a plain layer holds them (a StandInLayer's viewed ones are read, not held)."""
    if type(layer) not in _STAND_IN_CLASSES:
        return vars(layer)
    return {**{k: v for k, v in vars(layer).items() if not k.startswith("_bcg_")},
            **{name: getattr(layer, name) for name in layer._bcg_viewed}}


def _static_cache_layers(config: Any) -> list | None:
    """The (unallocated) layers of a StaticCache made from ``config``; None where transformers cannot build one."""
    try:
        return list(StaticCache(config=config, max_cache_len=1).layers)
    except Exception:  # a config transformers cannot build a static cache from: no stand-ins, the breaks serve
        return None


def makes_full_static_caches(config: Any) -> bool:
    """Whether a StaticCache made from ``config`` has full static layers only, plain or indexed (no sliding window, no
    mixer state)."""
    layers = _static_cache_layers(config)
    return bool(layers) and all(type(layer) in _STATIC_LAYER_FOR.values() for layer in layers)


def plain_static_layer_count(config: Any) -> int:
    """How many layers of a StaticCache made from ``config`` are plain StaticLayers a full decode graph updates (every
    layer a static attention layer: a hybrid's mixer states keep its decode steps off full graphs); else 0."""
    layers = _static_cache_layers(config) or []
    if not all(type(layer) in (StaticLayer, StaticSlidingWindowLayer, _STATIC_INDEXED_LAYER) for layer in layers):
        return 0
    return sum(type(layer) is StaticLayer for layer in layers)


def plain_static_layers(cache: Any) -> list:
    """The layers of a StaticCache (every layer static and allocated: ``static_layers``) that are transformers'
    StaticLayer running its class's ``update``, which (5.17-5.25) writes the new keys and values at the position its
    length counter holds, advances the counter by their length and returns the whole buffers: what a fused write may do
    in its place (fusion.py)."""
    return [layer for layer in static_layers(cache) or ()
            if type(layer) is StaticLayer and "update" not in vars(layer)]


def static_cache_like(config: Any, layers: list, max_cache_len: int) -> tuple[Any, tuple | None] | None:
    """A StaticCache of ``max_cache_len`` positions, allocated for the batch, heads and dtypes of ``layers`` (a
    dynamic cache's, ``full_dynamic_layers``; an indexed layer's indexer keys too, where it keeps them), or None when
    the config does not make each layer the static layer standing in for it. When the layers' shapes agree, every
    layer's keys (values) are slices of one tensor, returned beside the cache (else None)."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(cache.layers) != len(layers) or any(type(static) is not _STATIC_LAYER_FOR.get(type(dynamic))
                                               for static, dynamic in zip(cache.layers, layers)):
        return None
    shapes = {(layer.keys.shape[:2], layer.keys.shape[-1], layer.values.shape[-1], layer.keys.dtype,
               layer.values.dtype) for layer in layers}
    stacked = None
    if len(shapes) == 1:
        keys, values = layers[0].keys, layers[0].values
        stacked = tuple(t.new_zeros(len(layers), *t.shape[:2], max_cache_len, t.shape[-1]) for t in (keys, values))
    for i, (static, dynamic) in enumerate(zip(cache.layers, layers)):
        keys, values, *indexer_keys = dynamic_layer_tensors(dynamic)
        static.lazy_initialization(keys, values)
        if stacked is not None:  # the layer's own allocation goes at once: at most one layer's worth extra
            rebind_static_layer(static, (stacked[0][i], stacked[1][i]), (static.cumulative_length,))
        if indexer_keys:  # a layer reusing another's selection keeps none, here as in the dynamic cache
            static.lazy_initialization_indexer(indexer_keys[0])
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

"""Full-graph decode on static caches: a decode step is one graph, attention and the cache update inside it.

A StaticCache (full-attention layers) keeps its keys, values and length counters at fixed addresses, so a decode step
needs no break. bcg owns one set of cache tensors per cache shape and *binds* a caller's StaticCache to them (its
layers then point at bcg's tensors, holding what they held): every generate() call makes a new StaticCache, and
each one replays the same graphs. A cache still bound when another takes the tensors first gets copies of its own
back, so two live caches never share storage. Each cache shape (batch x length: generate() grows the length to the
longest call yet) holds a full set of keys and values: bcg keeps the ``MAX_STORAGES`` most recently used and frees the
graphs of one it drops. Graphs are keyed by the call's kind (inputs, autocast, fast), batch,
tokens per sequence, the masks' layout and the cache shape; anything else (a dynamic or sliding cache, a prefill)
takes the breakable path.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf
from .backends import Backend, Graph
from .eligibility import Call
from .errors import BcgCaptureWarning
from .live import LiveContext

logger = logging.getLogger("bcg")

MAX_TOKENS_PER_SEQUENCE = 1  # a decode step; prefills and multi-token steps use the breakable graphs
MAX_STORAGES = 2  # cache shapes whose tensors bcg keeps at once (each as large as the cache itself)


@dataclass
class _Storage:
    """bcg's tensors for one cache shape, and which cache is bound to them (weakly)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: list[torch.Tensor]
    holder: Callable[[], Any] = field(default=lambda: None)


@dataclass
class _Entry:
    """One captured decode graph and the static inputs it reads."""

    tokens: torch.Tensor
    positions: torch.Tensor
    masks: torch.Tensor | dict
    graph: Graph | None = None
    cache: Any = None  # the bound cache, only while a run is under way (a CUDA graph reads bcg's tensors anyway)


def _mask_layout(masks: Any) -> tuple | None:
    """A hashable description of the masks, or None when some mask is absent (then no full graph)."""
    if isinstance(masks, torch.Tensor):
        return (tuple(masks.shape), masks.dtype)
    if isinstance(masks, dict) and masks and all(isinstance(m, torch.Tensor) for m in masks.values()):
        return tuple(sorted((name, tuple(m.shape), m.dtype) for name, m in masks.items()))
    return None


def _copy_masks(target: torch.Tensor | dict, source: torch.Tensor | dict) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    else:
        for name, mask in target.items():
            mask.copy_(source[name])


def _clone_masks(masks: torch.Tensor | dict) -> torch.Tensor | dict:
    return masks.clone() if isinstance(masks, torch.Tensor) else {k: v.clone() for k, v in masks.items()}


def _unbind(cache: Any) -> None:
    """A cache bound to bcg's tensors keeps its contents in tensors of its own."""
    with torch.inference_mode(False):  # it may be used outside inference mode again
        for layer in hf.full_static_layers(cache) or ():
            hf.rebind_static_layer(layer, *(t.clone() for t in hf.static_layer_tensors(layer)))


class StaticDecoder:
    """Owns the full decode graphs of one wrapped stack and the cache tensors they read."""

    def __init__(self, backend: Backend, run_stack: Callable[..., torch.Tensor], cache_argument: str) -> None:
        self.backend = backend
        self.run_stack = run_stack  # (kind, **inputs): the original stack forward under no_grad (and bcg's fusions)
        self.cache_argument = cache_argument
        self.graphs: dict[tuple, _Entry] = {}
        self.failed: dict[tuple, str] = {}
        self.storages: dict[tuple, _Storage] = {}  # least recently used first
        self.max_storages = MAX_STORAGES

    def takes(self, call: Call) -> bool:
        """Whether this call is a decode step on a full static cache (checked before the masks are built)."""
        return call.tokens.shape[1] <= MAX_TOKENS_PER_SEQUENCE and hf.full_static_layers(call.cache) is not None

    def replay(self, call: Call, live: LiveContext) -> torch.Tensor | None:
        """The step's last hidden state ([B, S, hidden], the caller's own tensor), or None: take the breaks."""
        layout = _mask_layout(live.masks)
        if layout is None:
            return None
        layers = hf.full_static_layers(live.cache)
        tensors = map(hf.static_layer_tensors, layers)
        storage_key = tuple((tuple(k.shape), tuple(v.shape), k.dtype) for k, v, _ in tensors)
        key = (call.kind, live.batch, live.seq, layout, storage_key)
        if key in self.failed:
            return None
        self._bind(live.cache, layers, storage_key)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, call, live)
            if entry is None:
                return None
        entry.tokens.copy_(call.tokens)
        entry.positions.copy_(live.position_ids)
        _copy_masks(entry.masks, live.masks)
        entry.cache = live.cache
        try:
            return entry.graph.replay().clone()  # the graph's output is overwritten by the next replay
        finally:
            entry.cache = None

    # ----- binding caches to bcg's tensors -----
    def _bind(self, cache: Any, layers: list, storage_key: tuple) -> None:
        storage = self.storages.pop(storage_key, None)
        if storage is None:
            if len(self.storages) >= self.max_storages:
                self._drop(next(iter(self.storages)))
            with torch.inference_mode(False):  # they outlive the call
                tensors = [tuple(torch.zeros_like(t) for t in hf.static_layer_tensors(layer)) for layer in layers]
            storage = _Storage(*map(list, zip(*tensors)))
        self.storages[storage_key] = storage  # now the most recently used
        holder = storage.holder()
        if holder is cache:
            return
        if holder is not None:  # the other cache keeps its contents in tensors of its own
            _unbind(holder)
        for i, layer in enumerate(layers):
            for own, theirs in zip((storage.keys[i], storage.values[i], storage.lengths[i]),
                                   hf.static_layer_tensors(layer)):
                own.copy_(theirs)
            hf.rebind_static_layer(layer, storage.keys[i], storage.values[i], storage.lengths[i])
        storage.holder = weakref.ref(cache)

    # ----- capture -----
    def _capture(self, key: tuple, call: Call, live: LiveContext) -> _Entry | None:
        with torch.inference_mode(False):
            entry = _Entry(call.tokens.clone(), live.position_ids.clone(), _clone_masks(live.masks))
        inputs = {"input_ids" if call.inputs == "ids" else "inputs_embeds": entry.tokens}
        lengths = [hf.static_layer_tensors(layer)[2] for layer in hf.full_static_layers(live.cache)]
        saved = [length.clone() for length in lengths]
        entry.cache = live.cache
        try:
            with torch.inference_mode(False):
                entry.graph = self.backend.capture(lambda: self.run_stack(
                    call.kind, **inputs, position_ids=entry.positions, attention_mask=entry.masks, use_cache=True,
                    **{self.cache_argument: entry.cache}))
        except Exception as error:  # this shape takes the breaks instead
            self.failed[key] = f"{type(error).__name__}: {error}"
            logger.warning("bcg: full-graph decode capture for batch %d failed: %s", live.batch, self.failed[key])
            if len(self.failed) == 1:
                warnings.warn(f"bcg: capturing a full decode graph failed ({self.failed[key]}); static-cache decode "
                              "steps of that shape replay with breaks instead", BcgCaptureWarning, stacklevel=2)
            return None
        finally:
            entry.cache = None
            for length, value in zip(lengths, saved):  # warm-up runs advanced the counters: this step has not run
                length.copy_(value)
        self.graphs[key] = entry
        return entry

    def _drop(self, storage_key: tuple) -> None:
        """Let a cache shape's tensors go, with the graphs that read them (a cache bound to them keeps them: no one
        else writes them any more)."""
        del self.storages[storage_key]
        for key in [k for k in self.graphs if k[-1] == storage_key]:
            self.graphs.pop(key).graph.free()

    def free_graphs(self) -> None:
        for entry in self.graphs.values():
            entry.graph.free()
        self.graphs.clear()
        self.failed.clear()


# ----- dynamic caches decoded through a static stand-in (static_cache=True) -----
MIN_SHADOW_POSITIONS = 256


def shadow_positions(length: int) -> int:
    """Positions a stand-in holds for a dynamic cache of ``length`` tokens taking one more: the next power of two above
    ``length``, at least 256 (a few captures per generation; attention over at most twice the tokens)."""
    return max(MIN_SHADOW_POSITIONS, 1 << length.bit_length())


@dataclass
class _Shadow:
    """A StaticCache bcg owns for one shape, and the dynamic cache whose layers are views of it (weakly)."""

    cache: Any
    views: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # what the holder's layers hold
    holder: Callable[[], Any] = field(default=lambda: None)
    length: int = 0  # tokens the holder held when it was last bound


class ShadowCaches:
    """StaticCaches that stand in for DynamicCaches in decode steps, so a step is one full graph (static_cache=True).

    Before a step the dynamic cache's keys/values are copied into the stand-in of its shape (batch, layers, positions
    rounded up by ``shadow_positions``) unless its layers already are views of it; the step replays the stand-in's full
    decode graph; then the dynamic cache's layers become views of the stand-in's first ``length + 1`` positions, so the
    next step copies nothing. The caller keeps a DynamicCache throughout; its prompts and every multi-token call run on
    it as they would unwrapped. A dynamic cache whose stand-in another cache takes, or that bcg lets go, gets copies.
    """

    def __init__(self, config: Any, max_shadows: int = MAX_STORAGES) -> None:
        self.config = config
        self.max_shadows = max_shadows
        self.shadows: dict[tuple, _Shadow] = {}  # least recently used first
        self.possible = hf.makes_full_static_caches(config)  # else (sliding windows, mixers) no stand-in can serve

    def takes(self, call: Call) -> bool:
        """A decode step on a cache of plain dynamic layers (no sliding windows, no mixer states)."""
        return (self.possible and call.tokens.shape[1] <= MAX_TOKENS_PER_SEQUENCE
                and hf.full_dynamic_layers(call.cache) is not None)

    def bind(self, cache: Any) -> _Shadow | None:
        """The stand-in holding the keys, values and length of ``cache`` (one ``takes`` accepted); None when no static
        cache can stand in."""
        layers = list(cache.layers)
        length = layers[0].keys.shape[-2]
        positions = shadow_positions(length)
        key = (positions, tuple((tuple(layer.keys.shape[:2]), layer.keys.shape[-1], layer.values.shape[-1],
                                 layer.keys.dtype, layer.keys.device) for layer in layers))
        shadow = self.shadows.pop(key, None)
        if shadow is None:
            with torch.inference_mode(False):  # they outlive the call
                stand_in = hf.static_cache_like(self.config, layers, positions)
            if stand_in is None:
                return None
            if len(self.shadows) >= self.max_shadows:
                self._drop(next(iter(self.shadows)))
            shadow = _Shadow(stand_in)
        self.shadows[key] = shadow  # now the most recently used
        holder = shadow.holder()
        if holder is not None and holder is not cache:
            _give_copies(holder, shadow)
        for i, (layer, static) in enumerate(zip(layers, shadow.cache.layers)):
            keys, values = hf.dynamic_layer_tensors(layer)
            bound = (holder is cache and i < len(shadow.views)
                     and keys is shadow.views[i][0] and values is shadow.views[i][1])
            if not bound:  # a new cache, or one whose layers were reassigned (beam reordering, crop, an eager step)
                static_keys, static_values, counter = hf.static_layer_tensors(static)
                static_keys[:, :, :length].copy_(keys)
                static_values[:, :, :length].copy_(values)
                counter.fill_(length)
        shadow.holder, shadow.length = weakref.ref(cache), length
        return shadow

    @staticmethod
    def settle(cache: Any, shadow: _Shadow) -> None:
        """After the step ``bind`` prepared: the dynamic cache's layers become views of the stand-in's positions up to
        its new length."""
        length = shadow.length + 1
        shadow.views = []
        for layer, static in zip(cache.layers, shadow.cache.layers):
            keys, values, _ = hf.static_layer_tensors(static)
            view = (keys[:, :, :length], values[:, :, :length])
            hf.rebind_dynamic_layer(layer, *view)
            shadow.views.append(view)

    def _drop(self, key: tuple) -> None:
        shadow = self.shadows.pop(key)
        if (holder := shadow.holder()) is not None:  # its views would see whatever the stand-in's storage holds next
            _give_copies(holder, shadow)

    def clear(self) -> None:
        for key in list(self.shadows):
            self._drop(key)


def _give_copies(cache: Any, shadow: _Shadow) -> None:
    """A dynamic cache whose layers still hold (slices of: a crop) ``shadow``'s tensors gets tensors of its own."""
    with torch.inference_mode(False):  # it may be used outside inference mode again
        for layer, static in zip(getattr(cache, "layers", ()), shadow.cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            static_keys, static_values, _ = hf.static_layer_tensors(static)
            if _shares_storage(keys, static_keys) or _shares_storage(values, static_values):
                hf.rebind_dynamic_layer(layer, keys.clone(), values.clone())
    shadow.views = []


def _shares_storage(tensor: Any, other: torch.Tensor) -> bool:
    return (isinstance(tensor, torch.Tensor)
            and tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr())

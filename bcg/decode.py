"""Full-graph decode on static caches: a decode step is one graph, attention and the cache update inside it.

A StaticCache keeps its keys, values and length counters at fixed addresses, so a decode step needs no break; a
sliding-window layer too until its window is full (then it rolls the window, picked by a length it counts in Python
and with an index built on the host: those steps take the breaks). Replays advance that Python count as the step
would have. bcg owns one set of cache tensors per cache shape and binds a caller's StaticCache to them (binding.py):
every generate() call makes a new StaticCache, and each one replays the same graphs. Each cache shape (batch x
length: generate() grows the length to the longest call yet) holds a full set of keys and values: bcg keeps the
``MAX_STORAGES`` most recently used and frees the graphs of one it drops. Graphs are keyed by the call's graph key
(inputs, autocast, fast), batch, tokens per sequence, the masks' layout and the cache shape; anything else (a dynamic
cache, a full sliding window, a prefill) takes the breakable path. A step's 2D padding mask (or none) goes into the
graph as it is and transformers' own mask functions run inside it (``PaddingMask``): building the masks on the host
cost ~0.5 ms a step on an H200's host, more than the rest of the step's host work together.
"""

from __future__ import annotations

import functools
import logging
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import hf
from .backends import Backend, Graph
from .binding import Bindings, Storage
from .call import Call
from .errors import BcgCaptureWarning
from .live import LiveContext, PaddingMask
from .plan import GraphKey

logger = logging.getLogger("bcg")

MAX_TOKENS_PER_SEQUENCE = 1  # a decode step; prefills and multi-token steps use the breakable graphs
MAX_STORAGES = 2  # cache shapes whose tensors bcg keeps at once (each as large as the cache itself)


@dataclass
class _CacheTensors(Storage):
    """bcg's tensors for one cache shape (``key``): per layer its buffers (keys, values, an indexed layer's indexer
    keys) and their length counters (hf.static_layer_state)."""

    key: tuple
    layers: list[hf.StaticState]


BuildMasks = Callable[[torch.Tensor | None, Any, torch.Tensor, int, int], Any]  # (2D mask, cache, positions, B, S)


@dataclass
class _Entry:
    """One captured decode graph and the static inputs it reads: prepared masks, or a padding mask as wide as the
    cache (None: no padding) from which the graph builds them."""

    tokens: torch.Tensor
    positions: torch.Tensor
    masks: torch.Tensor | dict | None
    mask_width: int = 0  # a padding mask's columns that may hold ones (those past it are zeros)
    graph: Graph | None = None
    cache: Any = None  # the bound cache, only while a run is under way (a CUDA graph reads bcg's tensors anyway)


def _mask_layout(masks: Any, cache_length: int) -> tuple | None:
    """A hashable description of the masks, or None when no full graph can take them (a mask is absent, or a padding
    mask is wider than the cache)."""
    if not isinstance(masks, PaddingMask):
        return _prepared_layout(masks)
    if masks.mask is None:
        return ("padding", None)
    if masks.mask.ndim != 2 or masks.mask.shape[1] > cache_length:
        return None
    return ("padding", masks.mask.dtype)


def _prepared_layout(masks: Any) -> tuple | None:
    """Shapes and dtypes of masks built already (a tensor, or one per layer type), None for anything else."""
    if isinstance(masks, torch.Tensor):
        return (tuple(masks.shape), masks.dtype)
    if isinstance(masks, dict) and masks and all(isinstance(m, torch.Tensor) for m in masks.values()):
        return tuple(sorted((name, tuple(m.shape), m.dtype) for name, m in masks.items()))
    return None


def _input_copies(entry: _Entry, tokens: torch.Tensor, positions: torch.Tensor,
                  masks: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(targets, sources) of a step's copies into the graph's static inputs, made in one ``_foreach_copy_`` (one
    dispatch instead of one per tensor)."""
    targets, sources = [entry.tokens, entry.positions], [tokens, positions]
    target = entry.masks
    if isinstance(masks, PaddingMask):
        if target is not None:
            width = masks.mask.shape[1]
            targets.append(target[:, :width])
            sources.append(masks.mask)
            # The columns past the mask's are padding, as transformers pads a short mask: zeroed where an earlier
            # step's wider mask wrote (a decode step's mask grows by one column: no launch for it)
            if width < entry.mask_width:
                target[:, width:entry.mask_width].zero_()
            entry.mask_width = width
    elif isinstance(target, torch.Tensor):
        targets.append(target)
        sources.append(masks)
    else:
        for name, mask in target.items():
            targets.append(mask)
            sources.append(masks[name])
    return targets, sources


def _static_masks(masks: Any, cache_length: int) -> torch.Tensor | dict | None:
    """The entry's own tensors for ``masks`` (a padding mask's as wide as the cache)."""
    if isinstance(masks, PaddingMask):
        if masks.mask is None:
            return None
        return masks.mask.new_zeros(masks.mask.shape[0], cache_length)
    return masks.clone() if isinstance(masks, torch.Tensor) else {k: v.clone() for k, v in masks.items()}


def _holds_storage(layers: list, storage: _CacheTensors) -> bool:
    """Whether every layer holds the storage's tensors (a graph reads only those)."""
    return len(layers) == len(storage.layers) and all(
        len(held) == len(own) and all(map(operator.is_, held, own))
        for layer, (buffers, counters) in zip(layers, storage.layers)
        for held, own in zip(hf.static_layer_state(layer), (buffers, counters)))


class _HashedOnce(tuple):
    """A tuple that computes its hash once: a cache shape's key is part of every decode step's graph key."""

    @functools.cached_property
    def _hash(self) -> int:
        return tuple.__hash__(self)

    def __hash__(self) -> int:
        return self._hash


def _storage_key(layers: list) -> tuple:
    """Per layer, its buffers' shapes and dtypes (keys first)."""
    return _HashedOnce(tuple((tuple(t.shape), t.dtype) for t in hf.static_layer_state(layer)[0]) for layer in layers)


@functools.lru_cache(maxsize=64)
def _widest(storage_key: tuple) -> int:
    """The most positions a layer of the cache holds (sliding layers may hold fewer): a padding mask's width."""
    return max(layer[0][0][2] for layer in storage_key)


class StaticDecoder:
    """Owns the full decode graphs of one wrapped stack and the cache tensors they read (static caches' binder)."""

    def __init__(self, backend: Backend, run_stack: Callable[..., torch.Tensor], cache_argument: str,
                 build_masks: BuildMasks) -> None:
        self.backend = backend
        self.run_stack = run_stack  # (key, **inputs): the original stack forward under no_grad (and bcg's fusions)
        self.cache_argument = cache_argument
        self.build_masks = build_masks  # transformers' masks for a padding mask, run inside the graph
        self.graphs: dict[tuple, _Entry] = {}
        self.failed: dict[tuple, str] = {}
        self.bindings: Bindings[_CacheTensors] = Bindings(self, MAX_STORAGES)

    @staticmethod
    def layers_for(call: Call) -> list | None:
        """The cache's layers when this call is a decode step on a static cache that updates it in place (every
        sliding layer short of full; checked before the masks are built), else None."""
        if call.tokens.shape[1] > MAX_TOKENS_PER_SEQUENCE:
            return None
        return hf.static_layers(call.cache, new_tokens=call.tokens.shape[1])

    def failed_for(self, key: GraphKey, batch: int) -> bool:
        """A full graph of this key and batch failed to capture (for any cache shape)."""
        return any(k[0] == key and k[1] == batch for k in self.failed)

    def replay(self, key: GraphKey, tokens: torch.Tensor, live: LiveContext, layers: list,
               owned: bool = False) -> torch.Tensor | None:
        """The step's last hidden state ([B, S, hidden], the caller's own tensor), or None: take the breaks.
        ``layers``: those of ``live.cache``, static layers updated in place (``layers_for``, or a stand-in's).
        ``owned``: bcg's own cache (a stand-in), whose layers only binding rebinds: held means holding the storage."""
        latest = self.bindings.latest()
        bound = latest is not None and latest.held_by(live.cache) and (owned or _holds_storage(layers, latest))
        storage_key = latest.key if bound else _storage_key(layers)
        layout = _mask_layout(live.masks, cache_length=_widest(storage_key))
        if layout is None:
            return None
        graph_key = (key, live.batch, live.seq, layout, storage_key)
        if graph_key in self.failed:
            return None
        if not bound:
            self.bindings.bind(live.cache, storage_key, lambda: self._new_storage(layers, storage_key))
        entry = self.graphs.get(graph_key)
        if entry is None:
            entry = self._capture(graph_key, tokens, live, layers)
            if entry is None:
                return None
        torch._foreach_copy_(*_input_copies(entry, tokens, live.position_ids, live.masks))
        held = hf.host_lengths(layers) if not owned else []  # a stand-in has full layers only: no Python-side count
        entry.cache = live.cache
        try:
            hidden = entry.graph.replay().clone()  # the graph's output is overwritten by the next replay
        finally:
            entry.cache = None
        hf.set_host_lengths(held, live.seq)  # the graph advanced the length tensors; sliding layers count in Python too
        return hidden

    # ----- binding caches to bcg's tensors (binding.py) -----
    @staticmethod
    def _new_storage(layers: list, key: tuple) -> _CacheTensors:
        states = [hf.static_layer_state(layer) for layer in layers]
        if any(t.is_inference() for state in states for group in state for t in group):
            with torch.inference_mode(False):  # they outlive the call (and its inference mode)
                states = [tuple(tuple(map(torch.zeros_like, group)) for group in state) for state in states]
        # else the first cache of its shape lends its own tensors (a stand-in keeps its layout)
        return _CacheTensors(key, states)

    @staticmethod
    def copy_in(cache: Any, storage: _CacheTensors) -> None:
        """A new cache, or this one with layers given other tensors since (beam search reorders by assignment)."""
        layers = hf.static_layers(cache)
        if _holds_storage(layers, storage):
            return
        for layer, state in zip(layers, storage.layers):
            for own, theirs in zip((t for group in state for t in group),
                                   (t for group in hf.static_layer_state(layer) for t in group)):
                own.copy_(theirs)
            hf.rebind_static_layer(layer, *state)

    @staticmethod
    def hand_back(cache: Any, storage: _CacheTensors) -> None:
        with torch.inference_mode(False):  # it may be used outside inference mode again
            for layer in hf.static_layers(cache) or ():
                state = hf.static_layer_state(layer)
                hf.rebind_static_layer(layer, *(tuple(t.clone() for t in group) for group in state))

    def dropped(self, storage: _CacheTensors) -> None:
        """A cache bound to its tensors keeps them (no one else writes them any more); the graphs reading them go."""
        for key in [k for k in self.graphs if k[-1] == storage.key]:
            self.graphs.pop(key).graph.free()

    # ----- capture -----
    def _capture(self, key: tuple, tokens: torch.Tensor, live: LiveContext, layers: list) -> _Entry | None:
        graph_key = key[0]
        with torch.inference_mode(False):
            entry = _Entry(tokens.clone(), live.position_ids.clone(), _static_masks(live.masks, _widest(key[-1])))
        inputs = {"input_ids" if graph_key.inputs == "ids" else "inputs_embeds": entry.tokens}
        build_masks = isinstance(live.masks, PaddingMask)

        def run() -> torch.Tensor:
            with hf.sliding_lengths_as_tensors(entry.cache):
                masks = entry.masks
                if build_masks:
                    masks = self.build_masks(entry.masks, entry.cache, entry.positions, live.batch, live.seq)
                    if _prepared_layout(masks) is None:
                        raise RuntimeError(f"transformers' masks for this step are {type(masks).__name__}, not tensors")
                return self.run_stack(graph_key, **inputs, position_ids=entry.positions, attention_mask=masks,
                                      use_cache=True, **{self.cache_argument: entry.cache})

        lengths = [length for layer in layers for length in hf.static_layer_state(layer)[1]]
        saved = [length.clone() for length in lengths]
        held = hf.host_lengths(layers)

        def reset() -> None:  # every run writes this step's position: warm-ups must not move the cache on
            for length, value in zip(lengths, saved):
                length.copy_(value)
            hf.set_host_lengths(held, 0)

        entry.cache = live.cache
        try:
            with torch.inference_mode(False):
                entry.graph = self.backend.capture(run, reset)
        except Exception as error:  # this shape takes the breaks instead
            self.failed[key] = f"{type(error).__name__}: {error}"
            logger.warning("bcg: full-graph decode capture for batch %d failed: %s", live.batch, self.failed[key])
            if len(self.failed) == 1:
                warnings.warn(f"bcg: capturing a full decode graph failed ({self.failed[key]}); static-cache decode "
                              "steps of that shape replay with breaks instead", BcgCaptureWarning, stacklevel=2)
            return None
        finally:
            entry.cache = None
            reset()  # the runs advanced the counters: this step has not run yet
        self.graphs[key] = entry
        return entry

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor bcg holds for the caches' shapes (bound caches read them too)."""
        return [t for storage in self.bindings for buffers, _ in storage.layers for t in buffers]

    def free_graphs(self) -> None:
        for entry in self.graphs.values():
            entry.graph.free()
        self.graphs.clear()
        self.failed.clear()

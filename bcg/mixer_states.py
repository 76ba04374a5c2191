"""Decode steps of hybrid models with their stateful mixers inside the graph: bcg owns the mixers' states.

A mixer's decode step (one token per sequence, its convolution window and recurrent state allocated by the prefill)
updates its cache-layer states in place (transformers copies into them "to keep the static address"), so the step can
be captured like an MLP instead of costing a break (~1 ms of host time for a Gated DeltaNet in transformers' torch
code). A graph reads fixed addresses, and every ``generate()`` call makes a new cache: bcg owns one set of state
tensors per state shape and *binds* each caller's cache to them (its layers then point at bcg's tensors, holding what
they held), as ``decode.StaticDecoder`` does for static caches' keys and values. A cache still bound when another takes
the tensors gets copies of its own back, so two live caches never share storage. A warm-up or capture run advances the
states: they are put back afterwards. Each batch size has its own states (as large as a cache's) and graphs: bcg keeps
the ``MAX_STORAGES`` most recently used and frees the graphs of one it drops.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf

States = dict[int, dict[hf.MixerStateName, torch.Tensor]]  # mixer layer -> state name -> tensor
MAX_STORAGES = 4  # state shapes (batch sizes) kept at once


@dataclass
class _Storage:
    """bcg's state tensors for one shape signature, and the cache bound to them (weakly)."""

    tag: str  # part of the graph kind: graphs read these tensors' addresses
    tensors: States
    holder: Callable[[], Any] = field(default=lambda: None)


class MixerStates:
    """The state tensors decode graphs with inline mixers read, and the binding of caches to them."""

    def __init__(self, layers: list[int], max_storages: int = MAX_STORAGES) -> None:
        self.layers = layers  # the stateful mixers' layer indices
        self.max_storages = max_storages
        self.storages: dict[tuple, _Storage] = {}  # least recently used first
        self.dropped: list[str] = []  # tags of storages let go since the runner last freed their graphs
        self._made = 0

    def settled(self, cache: Any) -> States | None:
        """Every mixer's states in ``cache`` when each one's decode step updates them in place, else None."""
        found = {}
        for layer in self.layers:
            states = hf.settled_mixer_states(cache, layer)
            if states is None:
                return None
            found[layer] = states
        return found

    def bind(self, cache: Any, states: States) -> str:
        """Point ``cache``'s mixer states at bcg's tensors of their shapes (copying what they hold); the storage's
        tag."""
        key = tuple((layer, name, tuple(t.shape), t.dtype)
                    for layer, named in states.items() for name, t in named.items())
        storage = self.storages.pop(key, None)
        if storage is None:
            if len(self.storages) >= self.max_storages:
                self._drop(next(iter(self.storages)))
            with torch.inference_mode(False):  # they outlive the call
                tensors = {layer: {name: torch.zeros_like(t) for name, t in named.items()}
                           for layer, named in states.items()}
            storage = _Storage(f"mixers{self._made}", tensors)
            self._made += 1
        self.storages[key] = storage  # now the most recently used
        holder = storage.holder()
        if holder is not None and holder is not cache:  # the other cache keeps its contents in tensors of its own
            self._unbind(holder, storage)
        for layer, named in states.items():
            for name, tensor in named.items():
                own = storage.tensors[layer][name]
                if tensor is not own:  # a new cache, or one whose code reassigned a state (beam reordering, crop)
                    own.copy_(tensor)
                    hf.rebind_mixer_state(cache, layer, name, own)
        storage.holder = weakref.ref(cache)
        return storage.tag

    def _drop(self, key: tuple) -> None:
        """Let a storage go (a cache bound to it keeps its tensors: no one else writes them any more)."""
        self.dropped.append(self.storages.pop(key).tag)

    @staticmethod
    def _unbind(cache: Any, storage: _Storage) -> None:
        with torch.inference_mode(False):  # the cache may be used outside inference mode again
            for layer, named in storage.tensors.items():
                for name, own in named.items():
                    if hf.mixer_state(cache, layer, name) is own:
                        hf.rebind_mixer_state(cache, layer, name, own.clone())

    @contextmanager
    def kept(self, tag: str) -> Iterator[None]:
        """The tagged storage's contents as they were before the block (warm-up and capture runs advance them)."""
        storage = next(s for s in self.storages.values() if s.tag == tag)
        saved = {layer: {name: t.clone() for name, t in named.items()} for layer, named in storage.tensors.items()}
        try:
            yield
        finally:
            for layer, named in storage.tensors.items():
                for name, tensor in named.items():
                    tensor.copy_(saved[layer][name])

    def clear(self) -> None:
        """Let every storage go (unwrap, or graphs dropped)."""
        for key in list(self.storages):
            self._drop(key)
        self.dropped.clear()

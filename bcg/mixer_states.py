"""Decode steps of hybrid models with their stateful mixers inside the graph: bcg owns the mixers' states.

A mixer's decode step (one token per sequence, its convolution window and recurrent state allocated by the prefill)
updates its cache-layer states in place (transformers copies into them "to keep the static address"), so the step can
be captured like an MLP instead of costing a break (~1 ms of host time for a Gated DeltaNet in transformers' torch
code). A graph reads fixed addresses, and every ``generate()`` call makes a new cache: bcg owns one set of state
tensors per state shape and binds each caller's cache to them (binding.py). A warm-up or capture run advances the
states: they are put back afterwards. Each batch size has its own states (as large as a cache's) and graphs: bcg keeps
the ``MAX_STORAGES`` most recently used and frees the graphs of one it drops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import hf
from .binding import Bindings, Storage

States = dict[int, dict[hf.MixerStateName, torch.Tensor]]  # mixer layer -> state name -> tensor
MAX_STORAGES = 4  # state shapes (batch sizes) kept at once


@dataclass
class _States(Storage):
    """bcg's state tensors for one shape signature; graphs that read them are keyed by ``number``."""

    number: int
    tensors: States


class MixerStates:
    """The state tensors decode graphs with inline mixers read, and the binding of caches to them (binding.py)."""

    def __init__(self, layers: list[int], on_drop: Callable[[int], None], max_storages: int = MAX_STORAGES) -> None:
        self.layers = layers  # the stateful mixers' layer indices
        self.on_drop = on_drop  # a storage's number when it is let go: its graphs must go too
        self.bindings: Bindings[_States] = Bindings(self, max_storages)
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

    def bind(self, cache: Any, states: States) -> int:
        """Point ``cache``'s mixer states at bcg's tensors of their shapes (copying what they hold); the storage's
        number."""
        key = tuple((layer, name, tuple(t.shape), t.dtype)
                    for layer, named in states.items() for name, t in named.items())
        return self.bindings.bind(cache, key, lambda: self._new(states)).number

    def _new(self, states: States) -> _States:
        with torch.inference_mode(False):  # they outlive the call
            tensors = {layer: {name: torch.zeros_like(t) for name, t in named.items()}
                       for layer, named in states.items()}
        self._made += 1
        return _States(number=self._made - 1, tensors=tensors)

    # ----- Binder -----
    def copy_in(self, cache: Any, storage: _States) -> None:
        for layer, named in storage.tensors.items():
            for name, own in named.items():
                tensor = hf.mixer_state(cache, layer, name)
                if tensor is not own:  # a new cache, or one whose code reassigned a state (beam reordering, crop)
                    own.copy_(tensor)
                    hf.rebind_mixer_state(cache, layer, name, own)

    @staticmethod
    def hand_back(cache: Any, storage: _States) -> None:
        with torch.inference_mode(False):  # the cache may be used outside inference mode again
            for layer, named in storage.tensors.items():
                for name, own in named.items():
                    if hf.mixer_state(cache, layer, name) is own:
                        hf.rebind_mixer_state(cache, layer, name, own.clone())

    def dropped(self, storage: _States) -> None:
        """A cache bound to it keeps its tensors (no one else writes them any more); its graphs go."""
        self.on_drop(storage.number)

    @contextmanager
    def kept(self, number: int) -> Iterator[None]:
        """The numbered storage's contents as they were before the block (warm-up and capture runs advance them)."""
        storage = next(s for s in self.bindings if s.number == number)
        saved = {layer: {name: t.clone() for name, t in named.items()} for layer, named in storage.tensors.items()}
        try:
            yield
        finally:
            for layer, named in storage.tensors.items():
                for name, tensor in named.items():
                    tensor.copy_(saved[layer][name])

    def clear(self) -> None:
        self.bindings.clear()

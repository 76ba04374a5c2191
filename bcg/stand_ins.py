"""Static stand-ins (``static_cache=True``): a DynamicCache's decode steps as one full graph each.

Before a step the dynamic cache's keys/values (an indexed layer's indexer keys too) are copied into the StaticCache bcg
keeps for its shape (batch, layers, positions rounded up by ``stand_in_positions``) unless its layers read it already;
the step replays that stand-in's full decode graph (decode.py); then the dynamic cache's layers read the stand-in's
first ``length + 1`` positions (``hf.StandInLayer``: views made when read, so a step moves one count), and the next
step copies nothing. An indexed layer's stand-in is transformers' static indexed layer, so a step computes what a
StaticCache of the stand-in's positions computes: among exactly tied index scores it may select other keys than the
dynamic cache would (docs/design.md). The caller
keeps a DynamicCache throughout; its prompts and every multi-token call run on it as they would unwrapped. A dynamic
cache whose stand-in another cache takes, or that bcg lets go, gets copies (binding.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf
from .binding import Bindings, Storage
from .call import Call
from .decode import MAX_STORAGES, MAX_TOKENS_PER_SEQUENCE
from .errors import BcgFallbackWarning

MIN_POSITIONS = 256
SHARE_OF_FREE_MEMORY = 0.5  # a stand-in larger than this share of the device's free memory is not made


def stand_in_positions(length: int) -> int:
    """Positions a stand-in holds for a dynamic cache of ``length`` tokens taking one more: the next power of two above
    ``length``, at least 256 (a few captures per generation; attention over at most twice the tokens)."""
    return max(MIN_POSITIONS, 1 << length.bit_length())


@dataclass
class StandIn(Storage):
    """A StaticCache bcg owns for one shape; its holder is the dynamic cache whose layers read it (hf.StandInLayer)."""

    cache: Any
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # every layer's keys / values in one tensor
    length: int = 0  # the positions its holder's layers show
    read_by_holder: bool = False  # every layer of the holder reads it (bind found so, or settle made it so)

    positions: int = field(init=False)  # the static cache's width (every tensor bound to it later has it too)

    def __post_init__(self) -> None:
        self.positions = hf.static_layer_tensors(self.cache.layers[0])[0].shape[2]

    def view(self, which: int, index: int) -> torch.Tensor | None:
        """Layer ``index``'s keys (``which`` 0), values (1) or indexer keys (2; None where the layer keeps none) up to
        ``length`` positions: what its holder's layer shows."""
        buffers = hf.static_layer_state(self.cache.layers[index])[0]
        return buffers[which].narrow(-2, 0, self.length) if which < len(buffers) else None

    def let_unread_stack_go(self) -> None:
        """Bound to the tensors an earlier stand-in of its shape left (decode.py): its own stacked ones go."""
        if self.stacked is not None and hf.static_layer_tensors(self.cache.layers[0])[0]._base is not self.stacked[0]:
            self.stacked = None


class StandIns:
    """The StaticCaches that stand in for DynamicCaches in decode steps, bound as binding.py says."""

    def __init__(self, config: Any, max_stand_ins: int = MAX_STORAGES) -> None:
        self.config = config
        self.bindings: Bindings[StandIn] = Bindings(self, max_stand_ins)
        self.possible = hf.makes_full_static_caches(config)  # else (sliding windows, mixers) no stand-in can serve
        self.warned_memory = False

    def takes(self, call: Call) -> StandIn | list | None:
        """For a decode step on a cache of full-attention dynamic layers, plain or indexed (no sliding windows, no mixer
        states): the stand-in its layers read already (the step after a step), else its layers (to copy into one);
        None for any other step."""
        if not self.possible or call.tokens.shape[1] > MAX_TOKENS_PER_SEQUENCE:
            return None
        continued = self._continued(call.cache)
        return continued if continued is not None else hf.full_dynamic_layers(call.cache)

    def _continued(self, cache: Any) -> StandIn | None:
        """The stand-in ``cache``'s layers read from the step before, with room for one more token: the common case,
        the step after a step, is told by identity checks alone."""
        latest = self.bindings.latest()
        if (latest is not None and latest.held_by(cache) and stand_in_positions(latest.length) == latest.positions
                and _all_read(cache.layers, latest)):
            return latest
        return None

    def bind(self, cache: Any, found: StandIn | list) -> StandIn | None:
        """The stand-in holding the keys, values and length of ``cache``, given what ``takes`` found; None when no
        static cache can stand in."""
        if isinstance(found, StandIn):
            found.read_by_holder = True
            return found
        layers = found
        length = layers[0].keys.shape[-2]
        positions = stand_in_positions(length)
        key = (positions, tuple(_layer_shape(layer) for layer in layers))
        if key not in self.bindings.storages and not self._fits(layers, positions):
            return None
        stand_in = self.bindings.bind(cache, key, lambda: self._new(layers, positions))
        if stand_in is not None:
            stand_in.length, stand_in.read_by_holder = length, False
        return stand_in

    def _new(self, layers: list, positions: int) -> StandIn | None:
        with torch.inference_mode(False):  # they outlive the call
            made = hf.static_cache_like(self.config, layers, positions)
        return None if made is None else StandIn(*made)

    def _fits(self, layers: list, positions: int) -> bool:
        """Whether a stand-in of ``positions`` for these layers leaves the device enough memory (else the breaks serve
        this shape, with one warning)."""
        device = layers[0].keys.device
        free = free_device_memory(device)
        needed = sum(t.narrow(-2, 0, 1).numel() * t.element_size() * positions
                     for layer in layers for t in hf.dynamic_layer_tensors(layer))
        if free is None or needed <= SHARE_OF_FREE_MEMORY * free:
            return True
        if not self.warned_memory:
            self.warned_memory = True
            warnings.warn(f"bcg: a static stand-in of {positions} positions for batch "
                          f"{layers[0].keys.shape[0]} needs {needed / 2**20:.0f} MiB, more than half of the "
                          f"{free / 2**20:.0f} MiB free on {device}; decode steps of such shapes take the breaks "
                          "(wrap with static_cache=False to avoid the stand-ins altogether)", BcgFallbackWarning,
                          stacklevel=6)
        return False

    @staticmethod
    def settle(cache: Any, stand_in: StandIn) -> None:
        """After the step ``bind`` prepared: the dynamic cache's layers show the stand-in's positions up to its new
        length (after the first step, by moving that count alone)."""
        stand_in.length += 1
        if not stand_in.read_by_holder:  # the step's replay touches no layer of the caller's: bind's answer holds
            for i, layer in enumerate(cache.layers):
                hf.read_from(layer, stand_in, i)
            stand_in.read_by_holder = True
        stand_in.let_unread_stack_go()

    def tensors(self) -> list[torch.Tensor]:
        """The stand-ins' keys and values, indexer keys (and their stacked tensors, while held)."""
        return [t for stand_in in self.bindings
                for t in (*(stand_in.stacked or ()), *(t for layer in stand_in.cache.layers
                                                       for t in hf.static_layer_state(layer)[0]))]

    # ----- Binder -----
    @staticmethod
    def copy_in(cache: Any, stand_in: StandIn) -> None:
        """Copy a new cache's layers (or those reassigned since: beam reordering, crop, an eager step) into the
        stand-in: keys, values and an indexed layer's indexer keys, and every length counter."""
        layers = list(cache.layers)
        length = layers[0].keys.shape[-2]
        for layer, static in zip(layers, stand_in.cache.layers):
            if hf.reads_from(layer, stand_in):
                continue
            buffers, counters = hf.static_layer_state(static)
            for own, theirs in zip(buffers, hf.dynamic_layer_tensors(layer), strict=True):
                own.narrow(-2, 0, length).copy_(theirs)
            for counter in counters:
                counter.fill_(length)

    @staticmethod
    def hand_back(cache: Any, stand_in: StandIn) -> None:
        """A dynamic cache whose layers still read the stand-in, or hold slices of its tensors (a crop), gets copies."""
        with torch.inference_mode(False):  # it may be used outside inference mode again
            for layer, static in zip(getattr(cache, "layers", ()), stand_in.cache.layers):
                if hf.reads_from(layer, stand_in):
                    hf.hold_copies(layer)
                    continue
                held = hf.dynamic_layer_tensors(layer)
                if any(map(_shares_storage, held, hf.static_layer_state(static)[0])):
                    hf.rebind_dynamic_layer(layer, tuple(t.clone() for t in held))

    def dropped(self, stand_in: StandIn) -> None:
        """Its holder's views would see whatever the stand-in's storage holds next: they become copies."""
        if (holder := stand_in.holder()) is not None:
            self.hand_back(holder, stand_in)

    def clear(self) -> None:
        self.bindings.clear()


def _layer_shape(layer: Any) -> tuple:
    """What a stand-in's layer must match of a dynamic layer's: per tensor (keys, values, indexer keys where kept) its
    sizes but the positions, and dtype; the device."""
    tensors = hf.dynamic_layer_tensors(layer)
    return (*((tuple(t.shape[:-2]), t.shape[-1], t.dtype) for t in tensors), tensors[0].device)


def _all_read(layers: list, stand_in: StandIn) -> bool:
    """Whether every layer reads the stand-in (none was given tensors of its own since)."""
    return len(layers) == len(stand_in.cache.layers) and hf.all_read_from(layers, stand_in)


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a stacked stand-in's layers share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device (None elsewhere: no bound)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _shares_storage(tensor: Any, other: torch.Tensor) -> bool:
    return (isinstance(tensor, torch.Tensor)
            and tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr())

"""Full-graph decode on static caches: a decode step is one graph, attention and the cache update inside it.

A StaticCache keeps its keys, values and length counters at fixed addresses, so a decode step needs no break; a
sliding-window layer too until its window is full (then it rolls the window, picked by a length it counts in Python
and with an index built on the host: those steps take the breaks). Replays advance that Python count as the step
would have. bcg owns one set of cache tensors per cache shape and *binds* a caller's StaticCache to them (its
layers then point at bcg's tensors, holding what they held): every generate() call makes a new StaticCache, and
each one replays the same graphs. A cache still bound when another takes the tensors first gets copies of its own
back, so two live caches never share storage. Each cache shape (batch x length: generate() grows the length to the
longest call yet) holds a full set of keys and values: bcg keeps the ``MAX_STORAGES`` most recently used and frees the
graphs of one it drops. Graphs are keyed by the call's kind (inputs, autocast, fast), batch, tokens per sequence, the
masks' layout and the cache shape; anything else (a dynamic cache, a full sliding window, a prefill) takes the
breakable path. A step's 2D padding mask (or none) goes into the graph as it is and transformers' own mask functions
run inside it (``PaddingMask``): building the masks on the host cost ~0.5 ms a step on an H200's host, more
than the rest of the step's host work together.
"""

from __future__ import annotations

import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf
from .backends import Backend, Graph
from .eligibility import Call
from .errors import BcgCaptureWarning, BcgFallbackWarning
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
class PaddingMask:
    """A decode step's 2D padding mask (``[B, past + 1]``, or None: no padding) for the full graph to build the
    attention masks from, instead of masks built on the host."""

    mask: torch.Tensor | None


BuildMasks = Callable[[torch.Tensor | None, Any, torch.Tensor, int, int], Any]  # (2D mask, cache, positions, B, S)


@dataclass
class _Entry:
    """One captured decode graph and the static inputs it reads: prepared masks, or a padding mask as wide as the
    cache (None: no padding) from which the graph builds them."""

    tokens: torch.Tensor
    positions: torch.Tensor
    masks: torch.Tensor | dict | None
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


def _copy_masks(target: torch.Tensor | dict | None, source: Any) -> None:
    if isinstance(source, PaddingMask):
        if target is not None:  # the columns past the mask's are padding, as transformers pads a short mask
            width = source.mask.shape[1]
            target[:, :width].copy_(source.mask)
            target[:, width:].zero_()
    elif isinstance(target, torch.Tensor):
        target.copy_(source)
    else:
        for name, mask in target.items():
            mask.copy_(source[name])


def _static_masks(masks: Any, cache_length: int) -> torch.Tensor | dict | None:
    """The entry's own tensors for ``masks`` (a padding mask's as wide as the cache)."""
    if isinstance(masks, PaddingMask):
        if masks.mask is None:
            return None
        return masks.mask.new_zeros(masks.mask.shape[0], cache_length)
    return masks.clone() if isinstance(masks, torch.Tensor) else {k: v.clone() for k, v in masks.items()}


def _unbind(cache: Any) -> None:
    """A cache bound to bcg's tensors keeps its contents in tensors of its own."""
    with torch.inference_mode(False):  # it may be used outside inference mode again
        for layer in hf.static_layers(cache) or ():
            hf.rebind_static_layer(layer, *(t.clone() for t in hf.static_layer_tensors(layer)))


def _holds_storage(layers: list, storage: _Storage) -> bool:
    """Whether every layer holds the storage's tensors (a graph reads only those)."""
    held = list(zip(*map(hf.static_layer_tensors, layers))) or [(), (), ()]
    return all(map(_same_tensors, held, (storage.keys, storage.values, storage.lengths)))


def _storage_key(layers: list) -> tuple:
    return tuple((tuple(k.shape), tuple(v.shape), k.dtype) for k, v, _ in map(hf.static_layer_tensors, layers))


def _widest(storage_key: tuple) -> int:
    """The most positions a layer of the cache holds (sliding layers may hold fewer): a padding mask's width."""
    return max(keys_shape[2] for keys_shape, _, _ in storage_key)


class StaticDecoder:
    """Owns the full decode graphs of one wrapped stack and the cache tensors they read."""

    def __init__(self, backend: Backend, run_stack: Callable[..., torch.Tensor], cache_argument: str,
                 build_masks: BuildMasks) -> None:
        self.backend = backend
        self.run_stack = run_stack  # (kind, **inputs): the original stack forward under no_grad (and bcg's fusions)
        self.cache_argument = cache_argument
        self.build_masks = build_masks  # transformers' masks for a padding mask, run inside the graph
        self.graphs: dict[tuple, _Entry] = {}
        self.failed: dict[tuple, str] = {}
        self.storages: dict[tuple, _Storage] = {}  # least recently used first
        self.max_storages = MAX_STORAGES

    @staticmethod
    def layers_for(call: Call) -> list | None:
        """The cache's layers when this call is a decode step on a static cache that updates it in place (every
        sliding layer short of full; checked before the masks are built), else None."""
        if call.tokens.shape[1] > MAX_TOKENS_PER_SEQUENCE:
            return None
        return hf.static_layers(call.cache, new_tokens=call.tokens.shape[1])

    def replay(self, call: Call, live: LiveContext, layers: list) -> torch.Tensor | None:
        """The step's last hidden state ([B, S, hidden], the caller's own tensor), or None: take the breaks.
        ``layers``: those of ``live.cache``, static layers updated in place (``layers_for``, or a stand-in's)."""
        bound_key = self._bound_storage(live.cache, layers)
        storage_key = bound_key or _storage_key(layers)
        layout = _mask_layout(live.masks, cache_length=_widest(storage_key))
        if layout is None:
            return None
        key = (call.kind, live.batch, live.seq, layout, storage_key)
        if key in self.failed:
            return None
        if bound_key is None:
            self._bind(live.cache, layers, storage_key)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, call, live, layers)
            if entry is None:
                return None
        entry.tokens.copy_(call.tokens)
        entry.positions.copy_(live.position_ids)
        _copy_masks(entry.masks, live.masks)
        held = hf.host_lengths(layers)
        entry.cache = live.cache
        try:
            hidden = entry.graph.replay().clone()  # the graph's output is overwritten by the next replay
        finally:
            entry.cache = None
        hf.set_host_lengths(held, live.seq)  # the graph advanced the length tensors; sliding layers count in Python too
        return hidden

    # ----- binding caches to bcg's tensors -----
    def _bound_storage(self, cache: Any, layers: list) -> tuple | None:
        """The key of the most recently used storage when ``cache`` is bound to it still (every step after the first:
        checked by identity, cheaper than the shapes of every layer)."""
        if not self.storages:
            return None
        key, storage = next(reversed(self.storages.items()))
        return key if storage.holder() is cache and _holds_storage(layers, storage) else None

    def _bind(self, cache: Any, layers: list, storage_key: tuple) -> None:
        storage = self.storages.pop(storage_key, None)
        if storage is None:
            if len(self.storages) >= self.max_storages:
                self._drop(next(iter(self.storages)))
            tensors = [hf.static_layer_tensors(layer) for layer in layers]
            if any(t.is_inference() for layer_tensors in tensors for t in layer_tensors):
                with torch.inference_mode(False):  # they outlive the call (and its inference mode)
                    tensors = [tuple(torch.zeros_like(t) for t in layer_tensors) for layer_tensors in tensors]
            else:  # the first cache of its shape lends its own tensors (a stand-in keeps its layout)
                self.storages[storage_key] = _Storage(*map(list, zip(*tensors)), holder=weakref.ref(cache))
                return
            storage = _Storage(*map(list, zip(*tensors)))
        self.storages[storage_key] = storage  # now the most recently used
        holder = storage.holder()
        if holder is cache and _holds_storage(layers, storage):
            return
        if holder is not None and holder is not cache:  # the other cache keeps its contents in tensors of its own
            _unbind(holder)
        # a new cache, or this one with layers given other tensors since (beam search reorders by assignment)
        for i, layer in enumerate(layers):
            for own, theirs in zip((storage.keys[i], storage.values[i], storage.lengths[i]),
                                   hf.static_layer_tensors(layer)):
                own.copy_(theirs)
            hf.rebind_static_layer(layer, storage.keys[i], storage.values[i], storage.lengths[i])
        storage.holder = weakref.ref(cache)

    # ----- capture -----
    def _capture(self, key: tuple, call: Call, live: LiveContext, layers: list) -> _Entry | None:
        with torch.inference_mode(False):
            entry = _Entry(call.tokens.clone(), live.position_ids.clone(), _static_masks(live.masks, _widest(key[-1])))
        inputs = {"input_ids" if call.inputs == "ids" else "inputs_embeds": entry.tokens}
        build_masks = isinstance(live.masks, PaddingMask)

        def run() -> torch.Tensor:
            with hf.sliding_lengths_as_tensors(entry.cache):
                masks = entry.masks
                if build_masks:
                    masks = self.build_masks(entry.masks, entry.cache, entry.positions, live.batch, live.seq)
                    if _prepared_layout(masks) is None:
                        raise RuntimeError(f"transformers' masks for this step are {type(masks).__name__}, not tensors")
                return self.run_stack(call.kind, **inputs, position_ids=entry.positions, attention_mask=masks,
                                      use_cache=True, **{self.cache_argument: entry.cache})

        lengths = [hf.static_layer_tensors(layer)[2] for layer in layers]
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
        return [t for storage in self.storages.values() for t in (*storage.keys, *storage.values)]

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
SHADOW_SHARE_OF_FREE_MEMORY = 0.5  # a stand-in larger than this share of the device's free memory is not made


def shadow_positions(length: int) -> int:
    """Positions a stand-in holds for a dynamic cache of ``length`` tokens taking one more: the next power of two above
    ``length``, at least 256 (a few captures per generation; attention over at most twice the tokens)."""
    return max(MIN_SHADOW_POSITIONS, 1 << length.bit_length())


@dataclass
class _Shadow:
    """A StaticCache bcg owns for one shape, and the dynamic cache whose layers are views of it (weakly)."""

    cache: Any
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # every layer's keys / values in one tensor
    # the keys and the values its holder's layers hold
    views: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = ((), ())
    holder: Callable[[], Any] = field(default=lambda: None)
    length: int = 0  # tokens the holder held when it was last bound

    @property
    def positions(self) -> int:
        return hf.static_layer_tensors(self.cache.layers[0])[0].shape[2]

    def views_of(self, length: int) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        """Every layer's keys and values up to ``length`` positions (one view per layer)."""
        first_keys = hf.static_layer_tensors(self.cache.layers[0])[0]
        if self.stacked is not None and first_keys._base is not self.stacked[0]:
            self.stacked = None  # bound to the tensors an earlier stand-in of its shape left: let its own ones go
        if self.stacked is not None:  # only bcg rebinds a stand-in, all layers at once: two calls for all layers
            return tuple(stacked.narrow(3, 0, length).unbind(0) for stacked in self.stacked)
        tensors = [hf.static_layer_tensors(layer) for layer in self.cache.layers]
        return [k.narrow(2, 0, length) for k, _, _ in tensors], [v.narrow(2, 0, length) for _, v, _ in tensors]


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
        self.warned_memory = False

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
        if self.shadows:  # the common case, the step after a step: the cache holds the last stand-in's views
            shadow = next(reversed(self.shadows.values()))
            if (shadow.holder() is cache and shadow.positions == positions and shadow.length + 1 == length
                    and _holds_views(layers, shadow.views)):
                shadow.length = length
                return shadow
        key = (positions, tuple((tuple(layer.keys.shape[:2]), layer.keys.shape[-1], layer.values.shape[-1],
                                 layer.keys.dtype, layer.keys.device) for layer in layers))
        shadow = self.shadows.pop(key, None)
        if shadow is None:
            if not self._fits(layers, positions):
                return None
            if len(self.shadows) >= self.max_shadows:
                self._drop(next(iter(self.shadows)))
            with torch.inference_mode(False):  # they outlive the call
                stand_in = hf.static_cache_like(self.config, layers, positions)
            if stand_in is None:
                return None
            shadow = _Shadow(*stand_in)
        self.shadows[key] = shadow  # now the most recently used
        holder = shadow.holder()
        if holder is not None and holder is not cache:
            _give_copies(holder, shadow)
        if holder is not cache or not _holds_views(layers, shadow.views):
            self._copy_in(layers, shadow, holder is cache, length)
        shadow.holder, shadow.length = weakref.ref(cache), length
        return shadow

    def _fits(self, layers: list, positions: int) -> bool:
        """Whether a stand-in of ``positions`` for these layers leaves the device enough memory (else the breaks serve
        this shape, with one warning)."""
        device = layers[0].keys.device
        free = free_device_memory(device)
        needed = sum(t[:, :, :1].numel() * t.element_size() * positions
                     for layer in layers for t in hf.dynamic_layer_tensors(layer))
        if free is None or needed <= SHADOW_SHARE_OF_FREE_MEMORY * free:
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
    def _copy_in(layers: list, shadow: _Shadow, same_holder: bool, length: int) -> None:
        """Copy a new cache's layers (or those reassigned since: beam reordering, crop, an eager step) into the
        stand-in."""
        held_keys, held_values = shadow.views if same_holder else ((), ())
        for i, (layer, static) in enumerate(zip(layers, shadow.cache.layers)):
            keys, values = hf.dynamic_layer_tensors(layer)
            if i < len(held_keys) and keys is held_keys[i] and values is held_values[i]:
                continue
            static_keys, static_values, counter = hf.static_layer_tensors(static)
            static_keys[:, :, :length].copy_(keys)
            static_values[:, :, :length].copy_(values)
            counter.fill_(length)

    @staticmethod
    def settle(cache: Any, shadow: _Shadow) -> None:
        """After the step ``bind`` prepared: the dynamic cache's layers become views of the stand-in's positions up to
        its new length."""
        keys, values = shadow.views_of(shadow.length + 1)
        for layer, k, v in zip(cache.layers, keys, values):
            hf.rebind_dynamic_layer(layer, k, v)
        shadow.views = (keys, values)

    def tensors(self) -> list[torch.Tensor]:
        """The stand-ins' keys and values (and their stacked tensors, while held)."""
        return [t for shadow in self.shadows.values()
                for t in (*(shadow.stacked or ()), *(t for layer in shadow.cache.layers
                                                     for t in hf.static_layer_tensors(layer)[:2]))]

    def _drop(self, key: tuple) -> None:
        shadow = self.shadows.pop(key)
        if (holder := shadow.holder()) is not None:  # its views would see whatever the stand-in's storage holds next
            _give_copies(holder, shadow)

    def clear(self) -> None:
        for key in list(self.shadows):
            self._drop(key)


def _same_tensors(these: Sequence[torch.Tensor], those: Sequence[torch.Tensor]) -> bool:
    """The same tensor objects, pairwise (an identity check per tensor: every step runs one)."""
    return len(these) == len(those) and all(map(operator.is_, these, those))


def _holds_views(layers: list, views: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> bool:
    """Whether each layer still holds the views bcg gave it."""
    keys, values = zip(*map(hf.dynamic_layer_tensors, layers)) if layers else ((), ())
    return _same_tensors(keys, views[0]) and _same_tensors(values, views[1])


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a stacked stand-in's layers share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device (None elsewhere: no bound)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _give_copies(cache: Any, shadow: _Shadow) -> None:
    """A dynamic cache whose layers still hold (slices of: a crop) ``shadow``'s tensors gets tensors of its own."""
    with torch.inference_mode(False):  # it may be used outside inference mode again
        for layer, static in zip(getattr(cache, "layers", ()), shadow.cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            static_keys, static_values, _ = hf.static_layer_tensors(static)
            if _shares_storage(keys, static_keys) or _shares_storage(values, static_values):
                hf.rebind_dynamic_layer(layer, keys.clone(), values.clone())
    shadow.views = ((), ())


def _shares_storage(tensor: Any, other: torch.Tensor) -> bool:
    return (isinstance(tensor, torch.Tensor)
            and tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr())

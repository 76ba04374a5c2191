"""A break: the registered ``bcg`` attention function, the bridges around it and the break body.

While a stack runs under bcg (warm-up, capture, or an eager-backend replay) its attention modules call
``bcg_attention_forward`` instead of sdpa/flash/eager. That function copies q/k/v into owned bridge buffers
(captured into the current graph segment), ends the segment with a break, and returns the output bridge,
which the next segment reads. The break body runs eagerly on every replay: it reads the bridges, updates
the live KV cache and calls the model's *original* attention function with the live mask. A hybrid model's
stateful mixers are breaks of the same run (``mixers.py``): every break takes the next ``Slot`` of the ``StackRun``
and shares its ``Bridges``.

bcg registers no mask function on purpose: for an implementation unknown to ``AttentionMaskInterface``,
``masking_utils`` returns ``None`` before building anything, so no mask kernels or host syncs land in a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from . import hf, varlen
from .live import LIVE, LiveContext

if TYPE_CHECKING:
    from .mixers import ModuleBreaks

ATTENTION_NAME = "bcg"
# Implementations a packed prompt's break may replace by attention per request (varlen.py): SDPA applies the mask
# transformers built (causal, padding, a window), the flash implementations the layer's ``sliding_window`` kwarg.
_MASKED_IMPLEMENTATIONS = frozenset({"sdpa"})
_FLASH_IMPLEMENTATIONS = frozenset({"flash_attention_2", "flash_attention_3"})

# Attention kwargs that change from call to call: the break takes them from the live context, never from capture.
_PER_CALL_KWARGS = frozenset(
    {"position_ids", "cache_position", *hf.CACHE_ARGUMENTS, "use_cache", "output_attentions",
     "output_hidden_states", "attention_mask", "return_dict"}
)


class StructureError(RuntimeError):
    """The stack's attention calls do not fit one break per attention layer, in order: the model stays eager."""


class Bridges:
    """Owned buffers carrying q/k/v into a break and the attention output out of it.

    Allocated outside any graph pool, sized for the largest bucket, shared by all layers and buckets (layers run
    in order), and held for the wrapper's life: a graph reads them by address.
    """

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.device = device
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The ``[max_tokens, *shape]`` buffer of ``role`` (q, k, v, out for attention; hidden, out for mixers)."""
        key = (role, *shape, dtype)
        buffer = self.buffers.get(key)
        if buffer is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("bcg internal error: a bridge was first needed during capture, not warm-up")
            buffer = torch.zeros(self.max_tokens, *shape, dtype=dtype, device=self.device)
            self.buffers[key] = buffer
        return buffer

    def zero_output_tails(self, start: int, stop: int) -> None:
        """Zero rows [start, stop) of the output bridges: breaks write only the live rows, the tail stays harmless."""
        for (role, *_), buffer in self.buffers.items():
            if role == "out":
                buffer[start:stop].zero_()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class Slot(Protocol):
    """One break's call site: the module whose call it stands for, the masks it reads, and its eager body."""

    module: nn.Module

    @property
    def mask_keys(self) -> tuple[str, ...]: ...

    def run(self) -> None: ...


def run_break(slot: Slot) -> None:
    """The eager body between two graph segments (what ``Backend.wrap_break`` keeps out of the graphs)."""
    slot.run()


@dataclass
class BreakSlot:
    """One attention call site: its bridges, the original attention function and the per-layer constant kwargs."""

    module: nn.Module
    layer_idx: int
    layer_type: str
    attention_fn: Callable
    kwargs: dict
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    reuses_kv: bool = False  # reads the keys/values a storing layer of its type left (Gemma 3n / 4 KV sharing)
    stores_kv: bool = False
    varlen: bool = False  # packed prompts may attend per request (varlen.py) instead of through the padded layout
    window: int | None = None  # ... within this sliding window (what the layer's eager attention applies)

    @property
    def mask_key(self) -> str:
        return hf.attention_mask_key(self.layer_type)

    @property
    def mask_keys(self) -> tuple[str, ...]:
        return (self.mask_key,)

    def run(self) -> None:
        """Cache update and attention on the live tokens.

        Calls the model's own attention function (transformers' ``sdpa_attention_forward`` and its kernel dispatch,
        flash, or the modeling file's eager one), so the break computes exactly what the eager model computes.
        """
        live = LIVE.get()
        if self.varlen and live.requests is not None:
            self._run_per_request(live)
            return
        q, k, v = (live.attention_input(bridge) for bridge in (self.q, self.k, self.v))
        if live.cache is not None:
            # Without a cache the bridges already hold the shared keys/values: the graph copied them in like any other.
            if self.reuses_kv:
                k, v = live.shared_kv[self.layer_type]
            else:
                new_k, new_v = k, v
                k, v = hf.update_cache(live.cache, k, v, self.layer_idx)
                if self.stores_kv:
                    live.shared_kv[self.layer_type] = _owned(k, new_k), _owned(v, new_v)
        result, _ = self.attention_fn(self.module, q, k, v, live.mask_for(self.mask_key),
                                      position_ids=live.position_ids, **self.kwargs)
        live.write_output(self.out, result)

    def _run_per_request(self, live: LiveContext) -> None:
        """A packed prompt on an empty cache: the cache gets the padded layout later steps read (as above), attention
        runs on the bridges' real tokens per request, and no padded query, mask or output is ever built."""
        if live.cache is not None:
            hf.update_cache(live.cache, live.attention_input(self.k), live.attention_input(self.v), self.layer_idx)
        n = live.num_tokens
        result = varlen.attention(self.q[:n], self.k[:n], self.v[:n], live.requests, self.kwargs.get("scaling"),
                                  self.window)
        self.out[:n].copy_(result)


def _owned(states: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``states``, copied if the cache handed back (a view of) what it was given: a bridge or a per-call buffer that
    later layers overwrite before a reusing layer reads it."""
    same = states.untyped_storage().data_ptr() == given.untyped_storage().data_ptr()
    return states.clone() if same else states


def is_per_call(value: Any) -> bool:
    """A tensor (or a tuple or dict holding one) that is not a weight: it may change from call to call."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return any(is_per_call(v) for v in value)
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)


def per_call_arguments(kwargs: dict) -> list[str]:
    """The attention kwargs holding tensors computed per call that a break does not take from the live context."""
    return sorted(k for k, v in kwargs.items() if k not in _PER_CALL_KWARGS and is_per_call(v))


@dataclass
class StackRun:
    """State of one run of the stack under bcg: which break comes next and where its slot lives."""

    slots: list[Slot]
    bridges: Bridges
    original_implementation: str | None
    layer_types: list[str] | None
    break_fn: Callable[[Slot], None]
    mask_windows: dict[str, int | None]  # hf.mask_windows: which masks varlen.py can reproduce, and their windows
    layer_of: dict[int, int] = field(default_factory=dict)  # id(module) -> index of the stack layer holding it
    configs: list = field(default_factory=list)  # the configs the attention implementation is switched on
    module_breaks: ModuleBreaks | None = None  # the modules that are breaks of their own (mixers.py)
    # A hybrid model's decode step with its mixers inside the graph (mixer_states.py): the cache bound to bcg's state
    # tensors, and the number of sequences (the flat run's first rows).
    mixer_cache: Any = None
    decode_batch: int = 0
    breaks: int = 0
    _seen: set = field(default_factory=set)
    _stored_types: set = field(default_factory=set)

    def slot(self, module: nn.Module, new_slot: Callable[[], Slot]) -> Slot:
        """The next break's slot: the one made at first capture (checked to be the same module's), or a new one."""
        index = self.breaks
        self.breaks += 1
        if id(module) in self._seen:
            raise StructureError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) is applied "
                                 "several times per forward (a looped layer stack); its cache slots move per pass")
        self._seen.add(id(module))
        if index < len(self.slots):
            slot = self.slots[index]
            if slot.module is not module:
                raise StructureError(
                    f"break {index} came from {type(module).__name__} "
                    f"(layer {getattr(module, 'layer_idx', '?')}), not the module seen at first capture"
                )
        else:
            slot = new_slot()
            self.slots.append(slot)
        return slot

    def layer_type(self, layer_idx: int) -> str:
        return self.layer_types[layer_idx] if self.layer_types else "full_attention"

    def attention_slot(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       kwargs: dict) -> BreakSlot:
        slot = self.slot(module, lambda: self._new_slot(module, query, key, value, kwargs))
        if not isinstance(slot, BreakSlot):
            raise StructureError(f"an attention call came from {type(module).__name__}, which bcg took for a mixer")
        if slot.reuses_kv and slot.layer_type not in self._stored_types:
            raise StructureError(f"layer {slot.layer_idx} reuses {slot.layer_type} keys/values that no earlier layer "
                                 "of this stack stores (they come from outside the stack)")
        if slot.stores_kv:
            self._stored_types.add(slot.layer_type)
        return slot

    def _cache_slot(self, module: nn.Module) -> int:
        """The cache layer an attention module updates: its ``layer_idx``; for a shared block that takes the slot per
        call (its forward's ``layer_idx`` argument; Zamba2, whose attribute is -1), the stack layer holding it."""
        layer_idx = getattr(module, "layer_idx", len(self.slots))
        if isinstance(layer_idx, int) and layer_idx >= 0:
            return layer_idx
        holder = self.layer_of.get(id(module))
        if holder is None or "layer_idx" not in hf.forward_parameters(type(module).forward):
            raise StructureError(f"{type(module).__name__} has layer_idx {layer_idx!r} and bcg cannot tell which cache "
                                 "layer it updates")
        return holder

    def _new_slot(self, module, query, key, value, kwargs) -> BreakSlot:
        layer_idx = self._cache_slot(module)
        layer_type = self.layer_type(layer_idx)
        heads, _, dim = query.shape[1:]
        kv_heads, _, k_dim = key.shape[1:]
        v_dim = value.shape[-1]
        per_call = per_call_arguments(kwargs)
        if per_call:
            raise StructureError(f"{type(module).__name__} (layer {layer_idx}) passes {per_call} to its attention "
                                 "function per call, which bcg's break cannot supply")
        constant_kwargs = {k: v for k, v in kwargs.items() if k not in _PER_CALL_KWARGS}
        reuses_kv, stores_kv = hf.kv_sharing(module)
        reproducible, window = self._per_request_window(layer_type, constant_kwargs)
        per_request = reproducible and varlen.honours(module, constant_kwargs) and not (reuses_kv or stores_kv)
        return BreakSlot(
            module=module,
            layer_idx=layer_idx,
            layer_type=layer_type,
            attention_fn=hf.attention_function(self.original_implementation, module),
            kwargs=constant_kwargs,
            q=self.bridges.get("q", (heads, dim), query.dtype),
            k=self.bridges.get("k", (kv_heads, k_dim), key.dtype),
            v=self.bridges.get("v", (kv_heads, v_dim), value.dtype),
            out=self.bridges.get("out", (heads, v_dim), query.dtype),
            reuses_kv=reuses_kv,
            stores_kv=stores_kv,
            varlen=per_request,
            window=window,
        )

    def _per_request_window(self, layer_type: str, kwargs: dict) -> tuple[bool, int | None]:
        """Whether varlen.py can reproduce a layer's eager attention, and the sliding window that attention applies."""
        mask_key = hf.attention_mask_key(layer_type)
        if mask_key in self.mask_windows:
            if self.original_implementation in _MASKED_IMPLEMENTATIONS:
                return True, self.mask_windows[mask_key]
            if self.original_implementation in _FLASH_IMPLEMENTATIONS:
                return True, kwargs.get("sliding_window")
        return False, None


ACTIVE_RUN: ContextVar[StackRun | None] = ContextVar("bcg_active_run", default=None)


def bcg_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Registered as the ``bcg`` attention implementation; only ever active inside a bcg-managed stack run."""
    run = ACTIVE_RUN.get()
    if run is None:
        raise RuntimeError(
            "bcg attention was called outside a bcg-managed forward; call bcg.unwrap_model(model) "
            "instead of setting attn_implementation='bcg' by hand"
        )
    if run.module_breaks is not None and id(module) in run.module_breaks.in_graph_attention:
        # attention over the module's own tensors, with no cache (Inkling 2's over block states): no break, the model's
        # own attention function inside the graph
        function = hf.attention_function(run.original_implementation, module)
        return function(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise RuntimeError(f"bcg captures a flat [1, N] token run, got a batch of {query.shape[0]}")
    slot = run.attention_slot(module, query, key, value, kwargs)
    n = query.shape[2]
    slot.q[:n].copy_(query[0].transpose(0, 1))
    slot.k[:n].copy_(key[0].transpose(0, 1))
    slot.v[:n].copy_(value[0].transpose(0, 1))
    run.break_fn(slot)
    return slot.out[:n].unsqueeze(0), None


hf.register_attention(ATTENTION_NAME, bcg_attention_forward)


@contextmanager
def run_stack_under_bcg(run: StackRun, configs: list[Any]) -> Iterator[StackRun]:
    token = ACTIVE_RUN.set(run)
    try:
        with hf.attention_implementation(configs, ATTENTION_NAME):
            yield run
    finally:
        ACTIVE_RUN.reset(token)

"""The live context of one call: batch shape, cache, masks and positions, read by every break at replay.

Breaks never trust capture-time arguments for per-call state: everything that differs between calls lives
here and reaches the breaks through a ContextVar set around each replay.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf, varlen
from .call import Call
from .eligibility import Reject, Rejection, Target
from .varlen import Requests

# Model types whose stacks derive default positions from the 2D attention mask instead of counting from the cache.
_MASK_DERIVED_POSITIONS = frozenset({"opt"})
# Model types whose stacks count default positions from 0 whatever the cache holds (Bamba, 5.17 to 5.24).
_ZERO_BASED_POSITIONS = frozenset({"bamba"})


@dataclass
class PaddingMask:
    """A decode step's 2D padding mask (``[B, past + 1]``, or None: no padding) for a full graph to build the
    attention masks from, instead of masks built on the host."""

    mask: torch.Tensor | None


@dataclass
class LiveContext:
    """Per-call state: ``num_tokens`` live tokens of a ``batch x seq`` call, padded to ``bucket`` in the static buffers.

    ``rows`` (a padded call, packed): the flat ``batch * seq`` indices of its real tokens, which alone run through the
    graph segments; each break scatters them back into the ``[B, S]`` layout for the cache update and the attention
    (pad rows zero, masked out), and gathers the real rows of the output. ``requests`` (a packed prompt on an empty
    cache, mode "fast"): the eligible attention breaks attend per request on the real tokens instead (varlen.py).
    """

    batch: int
    seq: int
    num_tokens: int
    bucket: int
    cache: Any = None
    masks: torch.Tensor | dict | None = None
    position_ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    requests: Requests | None = None
    # while a decode graph with inline mixers is captured: (the cache bound to bcg's mixer states, sequences)
    capture_mixers: tuple[Any, int] | None = None
    shared_kv: dict = field(default_factory=dict, repr=False)  # layer type -> keys/values a storing layer left
    returned: dict = field(default_factory=dict, repr=False)  # id(module break slot) -> what it returned after hidden
    stack_arguments: dict = field(default_factory=dict, repr=False)  # what the stack makes per call: hf.stack_arguments
    _views: dict = field(default_factory=dict, repr=False)

    def inline_mixers(self) -> tuple[Any, int]:
        """(cache, sequences) a decode step's mixers inside the graph update: the capture's, or the live call's."""
        return self.capture_mixers or (self.cache, self.batch)

    def mask_for(self, layer_type: str) -> torch.Tensor | None:
        return self.masks[layer_type] if isinstance(self.masks, dict) else self.masks

    def token_input(self, bridge: torch.Tensor) -> torch.Tensor:
        """A token-major bridge's live tokens as ``[B, S, ...]`` (a view made once per call, or, packed, the call's
        own padded copy, pad rows zero, refreshed from the bridge)."""
        return self._input(bridge, heads_first=False)

    def attention_input(self, bridge: torch.Tensor) -> torch.Tensor:
        """A ``[tokens, H, D]`` bridge's live tokens as ``[B, H, S, D]``."""
        return self._input(bridge, heads_first=True)

    def relayout(self, flat: torch.Tensor) -> torch.Tensor:
        """A tensor the graph computed per token of its flat run (``[1, bucket, ...]``) in the call's ``[B, S, ...]``
        layout (pad rows zero); made anew on each call (no view cache: ``flat`` may be a temporary)."""
        tokens = flat[0, : self.num_tokens]
        if self.rows is None:
            return tokens.view(self.batch, self.seq, *tokens.shape[1:])
        padded = tokens.new_zeros(self.batch * self.seq, *tokens.shape[1:])
        return padded.index_copy_(0, self.rows, tokens).view(self.batch, self.seq, *tokens.shape[1:])

    def _input(self, bridge: torch.Tensor, heads_first: bool) -> torch.Tensor:
        # Every layer reads the same bridges: the views are made once per call (a break's host time is per layer).
        key = (id(bridge), heads_first)
        view = self._views.get(key)
        if view is None:
            if self.rows is None:
                view = bridge[: self.num_tokens].view(self.batch, self.seq, *bridge.shape[1:])
            else:
                view = bridge.new_zeros(self.batch, self.seq, *bridge.shape[1:])
            view = self._views[key] = view.transpose(1, 2) if heads_first else view
        if self.rows is not None:
            padded = view.transpose(1, 2) if heads_first else view
            padded.view(-1, *bridge.shape[1:]).index_copy_(0, self.rows, bridge[: self.num_tokens])
        return view

    def write_output(self, bridge: torch.Tensor, result: torch.Tensor) -> None:
        """Write a break's result ``[B, S, ...]`` (attention's ``[B, S, H, D]``) into the bridge's live rows."""
        if self.rows is None:
            bridge[: self.num_tokens].view(self.batch, self.seq, *bridge.shape[1:]).copy_(result)
        else:
            flat = result.reshape(self.batch * self.seq, *bridge.shape[1:])
            bridge[: self.num_tokens].copy_(flat.index_select(0, self.rows))  # copy_: autocast may change the dtype

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stack's output rows ``[num_tokens, hidden]`` as ``[B, S, hidden]``: the caller's own tensor, pad
        rows 0."""
        if self.rows is None:
            return hidden.view(self.batch, self.seq, -1).clone()
        padded = hidden.new_zeros(self.batch * self.seq, hidden.shape[-1])
        return padded.index_copy_(0, self.rows, hidden).view(self.batch, self.seq, -1)


def real_rows(attention_mask: Any, batch: int, seq: int, cache: Any) -> torch.Tensor | None:
    """The flat indices of a multi-token call's real tokens when its 2D mask pads some of them, else None.

    Reads the mask on the host once (a sync per prefill); decode steps (one token per sequence) are never packed.
    """
    if seq < 2 or not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        return None
    live = _new_columns(attention_mask, seq, cache).reshape(-1) != 0
    rows = live.nonzero().squeeze(1)
    return rows if 0 < rows.numel() < batch * seq else None


def _new_columns(attention_mask: torch.Tensor, seq: int, cache: Any) -> torch.Tensor:
    """The columns of a 2D mask that cover the call's new tokens: its last ``seq``, or, in a mask wider than the past
    and new tokens (padded on the right to a static cache's length, as Bloom's generate() does), those after the
    past, as transformers reads them."""
    past = hf.past_length(cache) if attention_mask.shape[-1] > seq else 0
    if attention_mask.shape[-1] > past + seq:
        return attention_mask[:, past:past + seq]
    return attention_mask[:, -seq:]


LIVE: ContextVar[LiveContext | None] = ContextVar("bcg_live_context", default=None)


def capture_context(bucket: int, mixers: tuple[Any, int] | None = None, masks: torch.Tensor | dict | None = None,
                    positions: torch.Tensor | None = None, stack_arguments: dict | None = None) -> LiveContext:
    """The context breaks see while a graph is warmed up or captured: one flat causal run, no cache (``mixers``: the
    cache a decode graph's inline mixers update, and its sequences; ``masks``, ``positions`` and ``stack_arguments``:
    that run's, for module breaks that read them themselves)."""
    return LiveContext(batch=1, seq=bucket, num_tokens=bucket, bucket=bucket, masks=masks, position_ids=positions,
                       capture_mixers=mixers, stack_arguments=stack_arguments or {})


def default_position_ids(
    model_type: str, attention_mask: Any, cache: Any, batch: int, seq: int, device: torch.device
) -> torch.Tensor | None:
    """Positions the stack would compute itself when the caller passes none (None: not derivable here)."""
    if model_type in _MASK_DERIVED_POSITIONS and attention_mask is not None:
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
            return None  # the model derives them from a 2D mask; a prepared 4D/dict mask does not say
        positions = torch.cumsum(attention_mask, dim=1)
        positions = (positions * attention_mask - 1).long()
        return positions[:, -seq:]
    past = 0 if model_type in _ZERO_BASED_POSITIONS else hf.past_length(cache)
    positions = torch.arange(seq, device=device) + past
    return positions.unsqueeze(0).expand(batch, seq)


def live_masks(
    config: Any,
    attention_mask: Any,
    cache: Any,
    position_ids: torch.Tensor,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    device: torch.device,
    full_only: bool = False,
) -> torch.Tensor | dict | None:
    """Masks per layer type, built before any cache update with transformers' own utilities.

    ``config`` must carry the model's original attention implementation. Prepared masks (4D or a dict, as
    ``generate()`` builds them for static caches) pass through untouched.
    """
    if isinstance(attention_mask, dict) or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4):
        return attention_mask
    return hf.create_masks(config, attention_mask, cache, position_ids, batch, seq, dtype, device, full_only)


@dataclass(frozen=True)
class ContextBuilder:
    """Builds a call's live context the way the stack itself would: its cache (one made as the stack makes it when
    none is given), its positions, and transformers' own masks per layer type, before anything touches the cache (so
    eager can still answer)."""

    target: Target  # the stack: its config, device, dtype (followed after a cast) and own cache class
    full_masks_only: bool  # hf.builds_full_masks_only
    varlen_prompts: bool  # packed prompts attend per request (varlen.py)

    @property
    def config(self) -> Any:
        return self.target.config

    def masks(self, mask: torch.Tensor | None, cache: Any, positions: torch.Tensor, batch: int,
              seq: int) -> torch.Tensor | dict | None:
        return live_masks(self.config, mask, cache, positions, batch, seq, self.target.dtype, self.target.device,
                          self.full_masks_only)

    def build(self, call: Call, num_tokens: int, bucket: int, rows: torch.Tensor | None = None,
              cache: Any = None, full_graph: bool = False,
              missing: Any = lambda masks: set()) -> LiveContext | Rejection:
        """``cache``: one standing in for the call's. ``full_graph``: a 2D padding mask (or none) is left for the graph
        to build the masks from, where this attention implementation's mask code can run inside one. ``missing``:
        the layer types whose breaks read a mask the built ones lack."""
        batch, seq = call.tokens.shape[:2]
        cache = cache if cache is not None else call.cache
        use_cache = call.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else self.target.use_cache()):
            cache = hf.new_cache(self.target.cache_class, self.config)
        mask = call.get("attention_mask")
        positions = call.get("position_ids")
        if positions is None:
            positions = default_position_ids(getattr(self.config, "model_type", ""), mask, cache, batch, seq,
                                             self.target.device)
            if positions is None:
                return Rejection(Reject.UNSUPPORTED_MASK, "a prepared mask, from which this model derives positions")
        positions = positions.expand(batch, seq)
        padding = mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)
        if full_graph and padding and hf.masks_build_in_graphs(self.target.implementation()):
            return LiveContext(batch, seq, num_tokens, bucket, cache, PaddingMask(mask), positions)
        try:
            masks = self.masks(mask, cache, positions, batch, seq)
        except Exception as error:
            return Rejection(Reject.MASK_FAILED, f"{type(error).__name__}: {error}")
        if isinstance(masks, dict) and (absent := missing(masks)):
            detail = (f"a mask dict keyed {sorted(masks)} (the model's own layout), without the masks {sorted(absent)} "
                      "the breaks read")
            return Rejection(Reject.UNSUPPORTED_MASK, detail)
        if isinstance(masks, torch.Tensor) and masks.ndim == 2:
            return Rejection(Reject.UNSUPPORTED_MASK, "a mask layout transformers leaves to the model")
        requests = None
        if rows is not None and self.varlen_prompts and hf.past_length(cache) == 0:
            requests = varlen.requests_of(mask, seq)
        padding = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        stack_arguments = hf.stack_arguments(self.target.module, padding, cache, batch, seq, self.target.dtype,
                                             self.target.device)
        return LiveContext(batch, seq, num_tokens, bucket, cache, masks, positions, rows, requests,
                           stack_arguments=stack_arguments)

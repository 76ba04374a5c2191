"""The live context of one call: batch shape, cache, masks and positions, read by every break at replay.

Breaks never trust capture-time arguments for per-call state: everything that differs between calls lives
here and reaches the breaks through a ContextVar set around each replay.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf

# Model types whose stacks derive default positions from the 2D attention mask instead of counting from the cache.
_MASK_DERIVED_POSITIONS = frozenset({"opt"})


@dataclass
class LiveContext:
    """Per-call state: ``batch * seq == num_tokens`` live tokens, padded to ``bucket`` in the static buffers."""

    batch: int
    seq: int
    num_tokens: int
    bucket: int
    cache: Any = None
    masks: torch.Tensor | dict | None = None
    position_ids: torch.Tensor | None = None
    shared_kv: dict = field(default_factory=dict, repr=False)  # layer type -> keys/values a storing layer left
    _views: dict = field(default_factory=dict, repr=False)

    def mask_for(self, layer_type: str) -> torch.Tensor | None:
        return self.masks[layer_type] if isinstance(self.masks, dict) else self.masks

    def tokens_of(self, bridge: torch.Tensor, heads_first: bool) -> torch.Tensor:
        """The live tokens of a token-major bridge as [B, S, H, D] (or [B, H, S, D]); made once per call.

        Bridges are shared by all layers, so every break of this call reuses the same views.
        """
        key = (id(bridge), heads_first)
        view = self._views.get(key)
        if view is None:
            view = bridge[: self.num_tokens].view(self.batch, self.seq, *bridge.shape[1:])
            view = view.transpose(1, 2) if heads_first else view
            self._views[key] = view
        return view


LIVE: ContextVar[LiveContext | None] = ContextVar("bcg_live_context", default=None)


def capture_context(bucket: int) -> LiveContext:
    """The context breaks see while a graph is warmed up or captured: one flat causal run, no cache."""
    return LiveContext(batch=1, seq=bucket, num_tokens=bucket, bucket=bucket)


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
    positions = torch.arange(seq, device=device) + hf.past_length(cache)
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
) -> torch.Tensor | dict | None:
    """Masks per layer type, built before any cache update with transformers' own utilities.

    ``config`` must carry the model's original attention implementation. Prepared masks (4D or a dict, as
    ``generate()`` builds them for static caches) pass through untouched.
    """
    if isinstance(attention_mask, dict) or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4):
        return attention_mask
    return hf.create_masks(config, attention_mask, cache, position_ids, batch, seq, dtype, device)

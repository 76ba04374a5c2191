"""How bcg serves one call, decided once before anything runs: a pure function of the call and the runner's state.

``plan_call`` gives a ``Plan``: the path (eager with its reject reason, the bucket's breakable graph, a hybrid's decode
step with its mixers inside that graph, or a decode step as one full graph on a static cache or on bcg's static
stand-in), the breakable graph's ``GraphKey`` and bucket, and a padded call's real tokens. A full-graph path may still
hand the call back to the breakable graph (its capture failed, its masks do not fit): the runner then replays
``plan.key``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from typing import Any

import torch

from .buckets import pick_bucket
from .call import Call
from .eligibility import Reject, Rejection, Target, reject_reason
from .live import real_rows


class Path(str, enum.Enum):
    """How a call is served."""

    EAGER = "eager"
    BREAKABLE = "breakable"  # the bucket's breakable graph: attention and mixers as breaks
    MIXERS_INLINE = "mixers inline"  # a hybrid's decode step: the breakable graph with the mixers inside
    FULL_STATIC = "full static"  # a decode step on a StaticCache: one graph, attention and cache update inside
    STAND_IN = "stand-in"  # a decode step on a dynamic cache through bcg's static stand-in: one graph


@dataclass(frozen=True)
class GraphKey:
    """A family of breakable graphs (one per bucket): what they were captured for."""

    inputs: str  # "ids" or "embeds"
    autocast: str = ""  # "" or "autocast-bfloat16", ...
    fast: bool = False  # decode steps' and packed prompts' graphs: fast attention kernels and fused kernels
    mixers: int | None = None  # a hybrid's decode step: the mixer-state storage its mixers read inside the graph
    # MoE experts' implementation (generate() switches grouped_mm to batched_mm for decode steps): a capture that
    # failed under one is tried again under another
    experts: str | None = None

    def __str__(self) -> str:
        """As ``stats()["captured_graphs"]`` names it: "ids", "ids/fast", "embeds@autocast-bfloat16/mixers0/fast",
        "ids[batched_mm]/fast"."""
        return (self.inputs + (f"@{self.autocast}" if self.autocast else "")
                + (f"[{self.experts}]" if self.experts is not None else "")
                + (f"/mixers{self.mixers}" if self.mixers is not None else "") + ("/fast" if self.fast else ""))

    def with_mixers(self, storage: int | None) -> GraphKey:
        return replace(self, mixers=storage)


@dataclass(frozen=True)
class Settings:
    """The runner's choices a plan reads (wrap.SpeedChoices, debug)."""

    fast_decode: bool = False  # decode steps replay fast graphs
    fast_padded: bool = False  # packed prompts replay fast graphs (varlen attention)


@dataclass(slots=True)  # a value, never changed once made (not frozen: a frozen init costs a µs more every call)
class Plan:
    path: Path
    key: GraphKey | None = None
    bucket: int | None = None
    num_tokens: int = 0  # tokens the graph segments compute: a packed call's real ones, else batch x sequence
    rows: torch.Tensor | None = None  # a padded multi-token call: its real tokens' flat indices (live.real_rows)
    rejection: Rejection | None = None
    found: Any = None  # what the path's check found, for the path to use (DecodePaths)

    @staticmethod
    def eager(reason: Reject, detail: str = "") -> Plan:
        return Plan(Path.EAGER, rejection=Rejection(reason, detail))


@dataclass(frozen=True)
class DecodePaths:
    """Which one-graph paths a decode step can take, asked of the runner's parts (pure questions, each answered with
    what it found, None for no)."""

    full_static: Callable[[Call], Any]  # the StaticCache's layers, updated in place
    stand_in: Callable[[Call, GraphKey], Any]  # the stand-in the cache reads already, or its layers to copy in
    mixers_inline: Callable[[Call], Any]  # the cache's mixer states, settled


def graph_experts(experts: str | None, fast: bool, dtype: torch.dtype) -> str | None:
    """The MoE experts implementation a graph runs: generate() switches bf16 experts to batched_mm for decode steps
    (fewer launches than grouped_mm, which graphs make free), which copies each selected expert's weights per token
    (at batch 8 the copies took 45% of an MLA + MoE model's decode step on an H100); a fast graph keeps grouped_mm,
    an exact one eager's choice. fp32 grouped_mm cannot be captured."""
    return "grouped_mm" if fast and experts == "batched_mm" and dtype == torch.bfloat16 else experts


@functools.lru_cache(maxsize=None)  # a few distinct keys per model: each made once, not on every call
def _graph_key(inputs: str, autocast: str, fast: bool, experts: str | None) -> GraphKey:
    return GraphKey(inputs, autocast, fast, experts=experts)


def plan_call(call: Call, target: Target, settings: Settings, failed: Container[tuple[GraphKey, int]],
              paths: DecodePaths) -> Plan:
    """How ``call`` is served: eager with a reason, or a path, graph key and bucket."""
    rejection = reject_reason(call, target)
    if rejection is not None:
        return Plan(Path.EAGER, rejection=rejection)
    batch, seq = call.tokens.shape[:2]
    # A padded call is packed before it is bucketed: the segments compute (and buckets count) its real tokens only.
    rows = real_rows(call.get("attention_mask"), batch, seq, call.cache)
    num_tokens = rows.numel() if rows is not None else batch * seq
    bucket = pick_bucket(target.sizes, num_tokens)
    if bucket is None:
        return Plan.eager(Reject.TOO_MANY_TOKENS, f"calls of more than {target.sizes[-1]} tokens")
    if bucket > 2 * num_tokens:
        return Plan.eager(Reject.PADDING_WASTE)
    decode = call.is_decode_step
    fast = (settings.fast_decode and decode) or (settings.fast_padded and rows is not None)
    key = _graph_key(call.inputs, call.autocast, fast, graph_experts(call.experts, fast, target.dtype))
    if (key, bucket) in failed:
        return Plan.eager(Reject.CAPTURE_FAILED)
    path, found = Path.BREAKABLE, None
    if decode:
        if (found := paths.full_static(call)) is not None:
            path = Path.FULL_STATIC
        elif (found := paths.stand_in(call, key)) is not None:
            path = Path.STAND_IN
        elif (found := paths.mixers_inline(call)) is not None:
            path = Path.MIXERS_INLINE
    return Plan(path, key, bucket, num_tokens, rows, found=found)

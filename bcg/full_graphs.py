"""Decode steps as one full graph each, attention and cache update inside: on a caller's StaticCache (decode.py) or,
with ``static_cache=True``, on the static stand-in bcg keeps for a DynamicCache (stand_ins.py). A step either path
cannot serve (its masks, a failed capture, no memory for a stand-in) goes back to the breakable graph."""

from __future__ import annotations

from typing import Any

import torch

from . import hf
from .backends import Backend
from .call import Call
from .decode import StaticDecoder
from .eligibility import Rejection
from .live import ContextBuilder, LiveContext
from .plan import GraphKey, Plan
from .segments import BreakableStack
from .stand_ins import StandIn, StandIns, held_bytes
from .stats import Stats


class FullGraphDecode:
    """The full decode graphs of one stack: a caller's static caches' and the stand-ins'."""

    def __init__(self, backend: Backend, segments: BreakableStack, contexts: ContextBuilder, stats: Stats,
                 static_cache: bool) -> None:
        self.backend, self.segments, self.contexts, self.stats = backend, segments, contexts, stats

        def decoder() -> StaticDecoder:
            return StaticDecoder(backend, segments.run_whole, segments.cache_argument, contexts.masks)

        self.decoder = decoder()
        # A stack that builds ALiBi biases from the 2D padding mask (Bloom) cannot take a full graph's prepared masks:
        # its steps take the breaks, whose attention gets the biases made for the live call.
        self.possible = not hf.builds_alibi(segments.stack.module)
        # static_cache=True: dynamic caches' decode steps run on static stand-ins, with full graphs of their own
        stand_ins = static_cache and self.possible
        self.stand_ins = StandIns(contexts.config) if stand_ins else None
        self.stand_in_decoder = decoder() if stand_ins else None

    def static_layers(self, call: Call) -> list | None:
        """A decode step's StaticCache layers when one graph can update them in place (decode.StaticDecoder)."""
        return StaticDecoder.layers_for(call) if self.possible else None

    def takes_stand_in(self, call: Call, key: GraphKey) -> StandIn | list | None:
        """For a decode step a stand-in can serve (unless its full graph failed to capture for this batch) what
        ``StandIns.takes`` found; None for any other step."""
        if self.stand_ins is None or self.stand_in_decoder.failed_for(key, call.tokens.shape[0]):
            return None
        return self.stand_ins.takes(call)

    def on_static_cache(self, call: Call, plan: Plan) -> Any | None:
        """A decode step on a static cache as one graph; None: the breakable graph takes it."""
        live = self.contexts.build(call, plan.num_tokens, plan.num_tokens, full_graph=True)
        if isinstance(live, Rejection):
            return None
        hidden = self._step(self.decoder, call, plan, live, plan.found)
        return None if hidden is None else hf.output_with_cache(self.segments.output_cls, hidden, live.cache)

    def on_stand_in(self, call: Call, plan: Plan) -> Any | None:
        """A decode step on a dynamic cache as one graph of its static stand-in; the caller's cache then holds views of
        the stand-in's tensors. None: the breakable graph takes it (the caller's cache untouched)."""
        stand_in = self.stand_ins.bind(call.cache, plan.found)
        if stand_in is None:
            return None
        live = self.contexts.build(call, plan.num_tokens, plan.num_tokens, cache=stand_in.cache, full_graph=True)
        if isinstance(live, Rejection):
            return None
        hidden = self._step(self.stand_in_decoder, call, plan, live, stand_in.cache.layers, owned=True)
        if hidden is None:
            return None
        self.stand_ins.settle(call.cache, stand_in)
        return hf.output_with_cache(self.segments.output_cls, hidden, call.cache)

    def _step(self, decoder: StaticDecoder, call: Call, plan: Plan, live: LiveContext, layers: list,
              owned: bool = False) -> torch.Tensor | None:
        captured = len(decoder.graphs)
        hidden = decoder.replay(plan.key, call.tokens, live, layers, owned)
        if hidden is None:
            return None
        if len(decoder.graphs) != captured:
            self.stats.full_graphs = sum(len(d.graphs) for d in self.decoders())
            self.stats.graph_bytes = self.backend.graph_bytes()
        self.stats.count_replay(full_graph=True)
        return hidden

    def decoders(self) -> list[StaticDecoder]:
        return [self.decoder] + ([self.stand_in_decoder] if self.stand_in_decoder is not None else [])

    def any_graphs(self) -> bool:
        return any(decoder.graphs for decoder in self.decoders())

    def held_bytes(self) -> int:
        """Memory of the cache tensors bcg holds for full-graph decode (its storages and the static stand-ins)."""
        tensors = [t for decoder in self.decoders() for t in decoder.tensors()]
        return held_bytes(tensors + (self.stand_ins.tensors() if self.stand_ins is not None else []))

    def free_graphs(self) -> None:
        for decoder in self.decoders():
            decoder.free_graphs()
        self.stats.full_graphs = 0

    def close(self) -> None:
        """Free the graphs and let every storage and stand-in go (unwrap)."""
        self.free_graphs()
        for decoder in self.decoders():
            decoder.bindings.clear()
        if self.stand_ins is not None:
            self.stand_ins.clear()

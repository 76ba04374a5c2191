"""The breakable graphs' side of the stack: bcg's static inputs, the bridges, and one run of the stack under breaks.

A breakable graph is the stack's original forward on the static ``[1, bucket]`` inputs, with every attention call and
stateful mixer routed through a break (attention.py, mixers.py). ``BreakableStack.capture`` records it (backends.py);
``replay`` copies a call's tokens and positions into the static inputs, sets the live context the breaks read, and
replays; a hybrid's decode step may run its mixers inside the graph instead, on the cache bound to bcg's state tensors
(mixer_states.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from . import hf
from .attention import Bridges, Slot, StackRun, StructureError, run_break, run_stack_under_bcg
from .backends import Backend, Graph
from .fusion import Fusions
from .live import LIVE, LiveContext, capture_context
from .mixers import ModuleBreaks, mixers_routed
from .plan import GraphKey
from .resolve import Stack


class BreakableStack:
    """What every breakable graph of one stack shares: static inputs, bridges, per-key break slots."""

    def __init__(self, stack: Stack, original_forward: Any, breaks: ModuleBreaks, fusions: Fusions | None,
                 backend: Backend, sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.stack = stack
        self.original_forward = original_forward
        self.breaks = breaks
        self.mixers = breaks.modules
        self.fusions = fusions
        self.backend = backend
        self.dtype, self.device = dtype, device
        config = stack.config
        self.cache_argument = hf.cache_argument(original_forward)
        self.full_masks_only = hf.builds_full_masks_only(config, original_forward)
        self.mask_windows = hf.mask_windows(config, self.full_masks_only)
        self.original_implementation = hf.attention_implementation_of(config)
        self.configs = hf.attention_configs(stack.module)
        self.layer_types = getattr(config, "layer_types", None)
        # one break per attention layer and per module break (an attending one in an attention layer is that layer's
        # attention break)
        self.expected_breaks = hf.attention_layers(config, stack.num_hidden_layers) + sum(
            not (id(module) in breaks.attending and hf.runs_attention(config, module.layer_idx))
            for module in breaks.modules)
        self.layer_of = {id(module): i for i, layer in enumerate(stack.layers) for module in layer.modules()}
        self.bridges = Bridges(sizes[-1], device)
        with torch.inference_mode(False):  # wrap_model may be called under inference mode; these outlive it
            self.static_ids = torch.zeros(1, sizes[-1], dtype=torch.long, device=device)
            self.static_positions = torch.zeros(1, sizes[-1], dtype=torch.long, device=device)
        self.static_embeds: torch.Tensor | None = None
        self.slots: dict[GraphKey, list[Slot]] = {}  # per graph key: bridges' dtypes follow the autocast state
        self.break_fn = backend.wrap_break(run_break)
        self.output_cls: type | None = None

    def attention_changed(self, implementation: str | None) -> None:
        self.original_implementation = implementation
        self.configs = hf.attention_configs(self.stack.module)

    def fused(self, key: GraphKey, cache: Any = None) -> Any:
        """The fused kernels in place for one run of a fast graph (a capture, or an eager-backend replay); ``cache``:
        the one a full decode graph updates."""
        return self.fusions.installed(cache) if self.fusions and key.fast else nullcontext()

    def capture(self, key: GraphKey, bucket: int, mixer_cache: tuple[Any, int] | None = None) -> Graph:
        """Capture the graph of ``key`` and ``bucket``; ``mixer_cache``: (cache bound to bcg's mixer states, sequences)
        for a decode step's graph with the mixers inside."""
        positions = torch.arange(bucket, device=self.device).unsqueeze(0)
        stack_arguments = hf.stack_arguments(self.stack.module, None, None, 1, bucket, self.dtype, self.device)
        token = LIVE.set(capture_context(bucket, mixer_cache, self._capture_masks(positions), positions,
                                         stack_arguments))
        try:
            if key.inputs == "embeds" and self.static_embeds is None:
                shape = (1, self.bridges.max_tokens, self.stack.config.hidden_size)
                self.static_embeds = torch.zeros(shape, dtype=self.dtype, device=self.device)
            return self.backend.capture(partial(self._run, key, bucket))
        finally:
            LIVE.reset(token)

    def _capture_masks(self, positions: torch.Tensor) -> torch.Tensor | dict | None:
        """The masks of one flat causal run, for attention modules that run as breaks of their own (indexed attention
        reads its mask itself); None where there are none."""
        if not self.breaks.attending:
            return None
        bucket = positions.shape[1]
        return hf.create_masks(self.stack.config, None, None, positions, 1, bucket, self.dtype, self.device,
                               self.full_masks_only)

    def _run(self, key: GraphKey, bucket: int) -> torch.Tensor:
        """One run of the original stack forward on the static inputs, attention routed through the breaks."""
        run = StackRun(self.slots.setdefault(key, []), self.bridges, self.original_implementation, self.layer_types,
                       self.break_fn, self.mask_windows, self.layer_of, self.configs, self.breaks)
        expected_breaks = self.expected_breaks
        if key.mixers is not None:  # the mixers run inside the graph, on the cache bound to bcg's state tensors
            run.mixer_cache, run.decode_batch = LIVE.get().inline_mixers()
            expected_breaks -= len(self.mixers)
        inputs = ({"input_ids": self.static_ids[:, :bucket]} if key.inputs == "ids"
                  else {"inputs_embeds": self.static_embeds[:, :bucket]})
        with torch.no_grad(), run_stack_under_bcg(run, self.configs), mixers_routed(self.mixers), self.fused(key), \
                hf.experts_running(self.stack.module, key.experts):
            output = self.original_forward(**inputs, position_ids=self.static_positions[:, :bucket],
                                           attention_mask=None, use_cache=False, **{self.cache_argument: None})
        if run.breaks != expected_breaks:
            modules = len(self.mixers)
            raise StructureError(
                f"{run.breaks} attention / module calls went through bcg's breaks where its layer types promise "
                f"{self.expected_breaks - modules} attention and {modules} module calls; the rest would be captured "
                "inside a graph (a layer type or module bcg does not know: please report it with the transformers "
                "version)"
            )
        self.output_cls = type(output)
        return output[0]

    def run_whole(self, key: GraphKey, **inputs: Any) -> torch.Tensor:
        """One run of the original stack forward, attention included (a full decode graph: no breaks); a fast one's
        masked SDPA takes grouped keys/values as they are."""
        gqa = hf.masked_gqa_in_sdpa() if key.fast else nullcontext()
        with torch.no_grad(), self.fused(key, inputs.get(self.cache_argument)), gqa, \
                hf.experts_running(self.stack.module, key.experts):
            output = self.original_forward(**inputs)
        self.output_cls = type(output)
        return output[0]

    def replay(self, graph: Graph, key: GraphKey, tokens: torch.Tensor, live: LiveContext) -> Any:
        """The call's output (its own tensors and the live cache) from one replay of ``graph``."""
        self._fill(key.inputs, tokens, live)
        token = LIVE.set(live)
        try:
            with self.backend.replay_context(fast=key.fast):
                hidden = graph.replay()
        finally:
            LIVE.reset(token)
        # The static output is overwritten by the next replay: the caller gets its own copy.
        return hf.output_with_cache(self.output_cls, live.unpack(hidden[0, :live.num_tokens]), live.cache)

    def _fill(self, inputs: str, tokens: torch.Tensor, live: LiveContext) -> None:
        n, bucket = live.num_tokens, live.bucket
        flat = self.static_ids if inputs == "ids" else self.static_embeds
        tokens = tokens.reshape(live.batch * live.seq, *tokens.shape[2:])
        positions = live.position_ids.reshape(live.batch * live.seq)
        if live.rows is not None:  # packed: only the real tokens run through the segments
            tokens, positions = tokens[live.rows], positions[live.rows]
        flat[0, :n].copy_(tokens)
        self.static_positions[0, :n].copy_(positions)
        if bucket > n:  # harmless pad in the tail: token 0 at position 0, zero attention output
            flat[0, n:bucket].zero_()
            self.static_positions[0, n:bucket].zero_()
            self.bridges.zero_output_tails(n, bucket)

    def missing_masks(self, key: GraphKey, masks: dict) -> set[str]:
        """Layer types whose breaks in ``key``'s graphs read a mask ``masks`` does not hold."""
        return {mask_key for slot in self.slots.get(key, ()) for mask_key in slot.mask_keys} - set(masks)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every bcg tensor the graphs read by address, by name (debug's address book)."""
        named = {f"bcg.bridge.{'.'.join(map(str, key))}": t for key, t in self.bridges.buffers.items()}
        named["bcg.static.input_ids"] = self.static_ids
        named["bcg.static.position_ids"] = self.static_positions
        if self.static_embeds is not None:
            named["bcg.static.inputs_embeds"] = self.static_embeds
        return named

    def forget(self, where: Callable[[GraphKey], bool]) -> None:
        """Drop the slots of the keys ``where`` selects (their graphs are gone)."""
        for key in [k for k in self.slots if where(k)]:
            del self.slots[key]

    def reset(self) -> None:
        """Slots, bridges and static embeddings carry the dtype, attention function and module references of the
        graphs they served: all go (the graphs went first)."""
        self.slots.clear()
        self.bridges.buffers.clear()
        self.static_embeds = None

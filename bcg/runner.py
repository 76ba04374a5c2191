"""The per-model runner: the patched stack forward. It plans each call (plan.py) and dispatches it to one path."""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from . import hf, verify
from .attention import StructureError
from .backends import Backend, Graph
from .call import Call, bind_call, positional_parameters
from .eligibility import KNOWN_ARGUMENTS, REPEATING, Reject, Rejection, Target
from .errors import BcgFallbackWarning, BcgInvalidatedWarning
from .fusion import Fusions
from .graphs import GraphTable
from .full_graphs import FullGraphDecode
from .live import ContextBuilder
from .mixer_states import MixerStates
from .mixers import ModuleBreaks, padded_mixer_types
from .plan import DecodePaths, GraphKey, Path, Plan, Settings, plan_call
from .resolve import Stack
from .segments import BreakableStack
from .state import Change, StateWatch
from .stats import Stats

logger = logging.getLogger("bcg")


class StackRunner:
    """Decides, per call, between the eager forward and a replay, and owns what the replays need."""

    def __init__(self, model: torch.nn.Module, stack: Stack, backend: Backend, sizes: list[int],
                 debug: bool | str = False, fusions: Fusions | None = None, fast_decode: bool = False,
                 breaks: ModuleBreaks | None = None, static_cache: bool = False,
                 varlen_prompts: bool = False, verify_replays: bool = False) -> None:
        self.model, self.stack, self.backend, self.sizes = model, stack, backend, sizes
        self.config = stack.config
        self.original_forward = stack.module.forward
        self._parameter_names = positional_parameters(self.original_forward)
        self._moe = hf.has_switchable_experts(model)
        first = next(stack.module.parameters())
        self.device = first.device
        breaks = breaks or ModuleBreaks()
        self.mixers = breaks.modules  # stateful mixers and latent attention modules: breaks of their own
        self.segments = BreakableStack(stack, self.original_forward, breaks, fusions, backend, sizes, first.dtype,
                                       self.device)
        self.cache_argument = self.segments.cache_argument
        self.target = Target(stack.module, self.config, self.device, first.dtype, sizes,
                             hf.stack_cache_class(self.original_forward))
        self.settings = Settings(fast_decode=fast_decode, fast_padded=fast_decode and varlen_prompts)
        self.stats = Stats(backend.name, fused=fusions.describe() if fusions is not None else {})
        self.table = GraphTable(backend, self.stats)
        # ... except in decode steps, where the mixers run inside the graph on state tensors bcg owns
        self.mixer_states = (MixerStates([m.layer_idx for m in self.mixers], self._mixer_storage_dropped)
                             if self.mixers and breaks.mixers_only else None)
        self.contexts = ContextBuilder(self.target, hf.builds_full_masks_only(self.config, self.original_forward),
                                       varlen_prompts)
        self.full_graphs = FullGraphDecode(backend, self.segments, self.contexts, self.stats, static_cache)
        self.paths = DecodePaths(
            full_static=self.full_graphs.static_layers, stand_in=self.full_graphs.takes_stand_in,
            mixers_inline=lambda call: self.mixer_states.settled(call.cache) if self.mixer_states else None)
        self.watch = StateWatch(stack.module, self.target.implementation, debug in (True, "addresses"),
                                self.segments.buffers)
        self.verifier = (verify.Verifier(first.dtype, self.stats, type(model).__name__, every_call=debug == "numerics")
                         if verify_replays or debug == "numerics" else None)
        self.disabled_reason: str | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._warned_rejects: set[Rejection] = set()

    @property
    def ready(self) -> bool:
        return self.disabled_reason is None

    # ----- the patched forward -----
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced by dynamo: step aside, uncounted (a lock cannot be traced)
            return self.original_forward(*args, **kwargs)
        if getattr(self._local, "active", False):
            self.stats.count_reject(Reject.REENTRANT.value)
            return self.original_forward(*args, **kwargs)
        experts = hf.experts_implementation(self.config) if self._moe else None
        call = bind_call(self._parameter_names, args, kwargs, KNOWN_ARGUMENTS, self.device, experts)
        with self._lock:  # static buffers and the attention switch are shared: one call at a time
            self._local.active = True
            try:
                return self._forward_locked(call)
            finally:
                self._local.active = False

    def _forward_locked(self, call: Call) -> Any:
        """1. the model as captured (else invalidate or step aside)  2. plan  3. verifying: a kind that failed runs
        eagerly, an unchecked one is checked (verify.py)  4. run the plan's path."""
        self._check_state()
        plan = self._plan(call)
        if self.verifier is not None and plan.path is not Path.EAGER:
            kind = self.verifier.kind(call, plan.path)
            if kind in self.verifier.failed:
                return self._eager(call, Rejection(Reject.VERIFICATION_FAILED, str(kind)))
            if self.verifier.wants(kind):
                return self.verifier.compare(call, kind, self._on_graphs, self.original_forward)
        return self._run(call, plan)

    def _plan(self, call: Call) -> Plan:
        if self.disabled_reason is not None:
            return Plan.eager(Reject.NOT_READY)
        return plan_call(call, self.target, self.settings, self.table.failed, self.paths)

    def _run(self, call: Call, plan: Plan) -> Any:
        """The plan's path; a full-graph path that cannot serve this step hands it to the breakable graph."""
        if plan.rejection is not None:
            return self._eager(call, plan.rejection)
        output = None
        if plan.path is Path.FULL_STATIC:
            output = self.full_graphs.on_static_cache(call, plan)
        elif plan.path is Path.STAND_IN:
            output = self.full_graphs.on_stand_in(call, plan)
        if output is None:
            output = self._replay_breakable(call, plan)
        return self._eager(call, output) if isinstance(output, Rejection) else output

    def _eager(self, call: Call, rejection: Rejection) -> Any:
        self.stats.count_reject(rejection.reason.value)
        advice = REPEATING.get(rejection.reason)
        if advice is not None and rejection not in self._warned_rejects:
            self._warned_rejects.add(rejection)
            warnings.warn(f"bcg: {type(self.model).__name__} ran eagerly ({rejection.describe()}) and will on every "
                          f"such call: {advice}. Counts are in handle.stats()['rejects'].", BcgFallbackWarning,
                          stacklevel=6)
        return self.original_forward(**call.arguments)

    def _on_graphs(self, call: Call) -> Any | None:
        """The call served as planned; None when it ran eagerly after all (a verification compares nothing then)."""
        replays = self.stats.replays
        output = self._run(call, self._plan(call))
        return output if self.stats.replays > replays else None

    # ----- the breakable graphs -----
    def _replay_breakable(self, call: Call, plan: Plan) -> Any | Rejection:
        key, mixer_cache = plan.key, None
        if plan.path is Path.MIXERS_INLINE:  # bind the cache's mixer states to bcg's: the mixers run in the graph
            inline = key.with_mixers(self.mixer_states.bind(call.cache, plan.found))
            if (inline, plan.bucket) not in self.table.failed:
                key, mixer_cache = inline, (call.cache, call.tokens.shape[0])
        try:
            graph = self._graph(key, plan.bucket, mixer_cache)
        except StructureError as error:
            self._disable(str(error))
            return Rejection(Reject.NOT_READY)
        if graph is None:
            return Rejection(Reject.CAPTURE_FAILED if self.disabled_reason is None else Reject.NOT_READY)
        live = self.contexts.build(call, plan.num_tokens, plan.bucket, plan.rows,
                                   missing=lambda masks: self.segments.missing_masks(key, masks))
        if isinstance(live, Rejection):
            return live
        if key.mixers is not None and (padded := padded_mixer_types(self.mixers, self.segments.layer_types, live)):
            return Rejection(Reject.UNSUPPORTED_MASK, f"a padding mask for the {padded} mixers of a decode step")
        output = self.segments.replay(graph, key, call.tokens, live)
        self.stats.count_replay()
        return output

    def _graph(self, key: GraphKey, bucket: int, mixer_cache: tuple[Any, int] | None = None) -> Graph | None:
        """The graph of ``key`` and ``bucket``, captured now if missing (``mixer_cache``: see segments.capture)."""

        def capture() -> Graph:
            kept = self.mixer_states.kept(key.mixers) if key.mixers is not None else nullcontext()
            with kept:  # a decode graph with inline mixers: warm-up and capture runs leave the states as they were
                graph = self.segments.capture(key, bucket, mixer_cache)
            self.stats.bridge_bytes = self.segments.bridges.nbytes
            self.watch.captured()
            return graph

        return self.table.get(key, bucket, capture)

    def capture_all(self) -> None:
        """Capture every size now (prompts' graphs and, in the fast mode, decode steps' own), largest first, so
        smaller buckets reuse the pool the largest one grew."""
        experts = hf.experts_implementation(self.config) if self._moe else None
        keys = [GraphKey("ids", experts=experts)] + ([GraphKey("ids", fast=True, experts=experts)]
                                                      if self.settings.fast_decode else [])
        for size in reversed(self.sizes):
            for key in keys:
                with self._lock:
                    if self.disabled_reason is not None:
                        return
                    try:
                        self._graph(key, size)
                    except StructureError as error:
                        self._disable(str(error))

    def _mixer_storage_dropped(self, number: int) -> None:
        """Graphs read their storage's addresses: a storage let go takes its graphs with it."""
        self.table.free(lambda key: key.mixers == number)
        self.segments.forget(lambda key: key.mixers == number)

    # ----- state changes -----
    def _check_state(self) -> None:
        """Graphs bake in weight addresses and the attention function: if either changed, drop them or step aside."""
        if self.disabled_reason is not None:
            return
        change = self.watch.check()
        if change is None:
            self.watch.settled()
            return
        if change.fatal:
            self._disable(change.why)
            return
        self.segments.attention_changed(self.watch.implementation)
        self.target.dtype = self.watch.dtype
        dropped = self._invalidate(change.why)
        thrashing: Change | None = self.watch.invalidated(dropped)
        if thrashing is not None:
            self._disable(thrashing.why)

    def _invalidate(self, why: str) -> bool:
        """Drop every graph and what was built for them; the next calls capture again. Whether graphs were dropped."""
        dropped = bool(self.table.graphs) or self.full_graphs.any_graphs()
        if dropped:
            warnings.warn(f"bcg: {why}; dropping all graphs, they are captured again on use", BcgInvalidatedWarning,
                          stacklevel=6)
            self.stats.invalidations += 1
        self.free_graphs()
        self._forget_what_graphs_were_built_with()
        self.table.forget_failures()
        return dropped

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.free_graphs()
        warnings.warn(f"bcg: {reason}; the model stays eager", BcgFallbackWarning, stacklevel=7)

    def free_graphs(self) -> None:
        self.full_graphs.free_graphs()
        self.table.free()

    def _forget_what_graphs_were_built_with(self) -> None:
        """Slots and bridges carry the dtype, attention function and module references of the graphs they served;
        mixer states their dtype."""
        if self.mixer_states is not None:
            self.mixer_states.clear()
        self.segments.reset()

    def close(self) -> None:
        """Free the graphs and everything made for them, and stop watching the model (unwrap; a handle kept by the
        caller then holds only the stats)."""
        self.table.free()
        self.full_graphs.close()
        self._forget_what_graphs_were_built_with()
        self.watch.close()

"""The per-model runner: the patched stack forward, buckets, static inputs, capture and replay."""

from __future__ import annotations

import copy
import logging
import threading
import time
import traceback
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from . import debug as addresses
from . import hf, varlen, verify
from .attention import Bridges, Slot, StackRun, StructureError, run_break, run_stack_under_bcg
from .backends import Backend, Graph
from .buckets import pick_bucket
from .decode import PaddingMask, ShadowCaches, StaticDecoder, held_bytes
from .eligibility import KNOWN_ARGUMENTS, REPEATING, Call, Reject, Rejection, Target, reject_reason
from .errors import BcgCaptureWarning, BcgFallbackWarning, BcgInvalidatedWarning
from .fusion import Fusions
from .live import LIVE, LiveContext, capture_context, default_position_ids, live_masks
from .mixer_states import MixerStates
from .mixers import mixers_routed
from .resolve import Stack
from .stats import Stats

logger = logging.getLogger("bcg")

_THRASHING_CALLS = 3  # calls in a row that each invalidate the graphs: the model changes itself, bcg steps aside


class StackRunner:
    """Owns the graphs of one model's stack and decides, per call, between replay and the eager forward."""

    def __init__(self, model: torch.nn.Module, stack: Stack, backend: Backend, sizes: list[int],
                 debug: bool | str = False, fusions: Fusions | None = None, fast_decode: bool = False,
                 mixers: list[torch.nn.Module] | None = None, static_cache: bool = False,
                 varlen_prompts: bool = False, verify_replays: bool = False) -> None:
        self.model = model
        self.stack = stack
        self.config = stack.config
        self.backend = backend
        self.sizes = sizes
        self.debug = debug
        self.strict_addresses = debug in (True, "addresses")
        self.fusions = fusions
        self.fast_decode = fast_decode  # decode steps (and padded prompts) get their own graphs, with the fusions
        self.varlen_prompts = varlen_prompts  # packed prompts attend per request (varlen.py), not through padding
        self.original_forward = stack.module.forward
        self._parameter_names = _positional_parameters(self.original_forward)
        self.cache_argument = hf.cache_argument(self.original_forward)
        self.full_masks_only = hf.builds_full_masks_only(self.config, self.original_forward)
        self.mask_windows = hf.mask_windows(self.config, self.full_masks_only)
        self.original_implementation = hf.attention_implementation_of(self.config)
        self.configs = hf.attention_configs(stack.module)
        self.layer_types = getattr(self.config, "layer_types", None)
        self.model_type = getattr(self.config, "model_type", "")
        first = next(stack.module.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.cache_class = hf.stack_cache_class(self.original_forward)
        self.target = Target(stack.module, self.config, self.device, self.dtype, sizes, self.cache_class)
        self.mixers = mixers or []  # stateful token mixers (hybrid models): breaks like attention
        # ... except in decode steps, where they run inside the graph on state tensors bcg owns
        self.mixer_states = MixerStates([m.layer_idx for m in self.mixers]) if self.mixers else None
        self._mixer_mask_keys = sorted({hf.mixer_mask_key(self.layer_types[m.layer_idx]) for m in self.mixers}
                                       if self.layer_types else set())
        self._decode_cache: tuple[Any, int] | None = None  # (cache, sequences) of the decode step being replayed
        self.expected_breaks = hf.attention_layers(self.config, len(stack.layers)) + len(self.mixers)
        self.layer_of = {id(module): i for i, layer in enumerate(stack.layers) for module in layer.modules()}

        max_tokens = sizes[-1]
        self.bridges = Bridges(max_tokens, self.device)
        with torch.inference_mode(False):  # wrap_model may be called under inference mode; these outlive it
            self.static_ids = torch.zeros(1, max_tokens, dtype=torch.long, device=self.device)
            self.static_positions = torch.zeros(1, max_tokens, dtype=torch.long, device=self.device)
        self.static_embeds: torch.Tensor | None = None
        self.slots: dict[str, list[Slot]] = {}  # per graph kind: bridges' dtypes follow the autocast state
        self.break_fn = backend.wrap_break(run_break)
        self.graphs: dict[tuple[str, int], Graph] = {}
        self.failed: dict[tuple[str, int], str] = {}
        self.output_cls: type | None = None
        self.disabled_reason: str | None = None
        self.stats = Stats(backend.name, fused=fusions.describe() if fusions is not None else {})
        self.decoder = StaticDecoder(backend, self._run_plain, self.cache_argument, self._build_masks)
        # static_cache=True: dynamic caches' decode steps run on static stand-ins, with full graphs of their own
        self.shadows = ShadowCaches(self.config) if static_cache else None
        self.shadow_decoder = (StaticDecoder(backend, self._run_plain, self.cache_argument, self._build_masks)
                               if static_cache else None)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._watch = addresses.AddressWatch(stack.module)
        self._address_book: dict[str, tuple] | None = None
        self._warned_capture = False
        self._calls_invalidating = 0  # consecutive calls that found the state changed
        self._warned_rejects: set[Rejection] = set()
        self.verifier = verify.Verifier(self.dtype) if verify_replays else None

    # ----- the patched forward -----
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced by dynamo: step aside, uncounted (a lock cannot be traced)
            return self.original_forward(*args, **kwargs)
        if getattr(self._local, "active", False):
            self.stats.count_reject(Reject.REENTRANT.value)
            return self.original_forward(*args, **kwargs)
        call = self._bind(args, kwargs)
        with self._lock:  # static buffers and the attention switch are shared: one call at a time
            self._local.active = True
            try:
                return self._forward_locked(call)
            finally:
                self._local.active = False

    def _forward_locked(self, call: Call) -> Any:
        """0. verifying (verify.py): a kind that failed its check runs eagerly; the first call of a kind is checked."""
        if self.verifier is not None and self._eligible(call):
            kind = self._verification_kind(call)
            if kind in self.verifier.failed:
                self._count_reject(Rejection(Reject.VERIFICATION_FAILED, str(kind)))
                return self.original_forward(**call.arguments)
            if kind not in self.verifier.checked:
                return self._verified(call, kind)
        return self._dispatch(call)

    def _eligible(self, call: Call) -> bool:
        return self.disabled_reason is None and reject_reason(call, self.target, self.failed) is None

    def _verification_kind(self, call: Call) -> verify.Kind:
        cache = call.cache
        path = verify.Path.BREAKABLE
        if call.is_decode_step:
            if self.decoder.layers_for(call) is not None:
                path = verify.Path.FULL_STATIC
            elif self.shadows is not None and self.shadows.takes(call):
                path = verify.Path.STAND_IN
            elif self.mixer_states is not None and self.mixer_states.settled(cache) is not None:
                path = verify.Path.MIXERS_INLINE
        return verify.Kind(verify.phase_of(call.tokens, cache), path,
                           type(cache).__name__ if cache is not None else "none")

    def _verified(self, call: Call, kind: verify.Kind) -> Any:
        """The call on bcg's graphs with a copy of its cache, then on the eager model with its own; eager's answer."""
        cache = call.cache
        copied = self._bind((), {name: hf.copy_cache(value) if value is cache and value is not None else value
                                 for name, value in call.arguments.items()})
        replays = self.stats.replays
        graph_output = self._dispatch(copied)
        eager_output = self.original_forward(**call.arguments)
        if self.stats.replays == replays:  # it ran eagerly after all: nothing to compare
            return eager_output
        difference = verify.difference(graph_output, eager_output, call.get("attention_mask"))
        if not self.verifier.record(kind, difference):
            warnings.warn(
                f"bcg: {type(self.model).__name__}'s {kind} calls differ from eager by {difference} on transformers "
                f"{hf.installed_transformers()}; they run eagerly from now on. Please report it with your "
                "transformers version (see handle.stats()['verify']).", BcgFallbackWarning, stacklevel=5)
        logger.info("bcg: verified %s: %s", kind, difference)
        return eager_output

    def _dispatch(self, call: Call) -> Any:
        """1. state as captured (else invalidate)  2. eligible?  3. a decode step on a static cache (or, with
        static_cache=True, on a dynamic one through its static stand-in): one full graph  4. else the bucket's breakable
        graph (a hybrid's decode step: its kind holds the mixers inside)  5. else eager, the reason counted."""
        if self.disabled_reason is None:
            self._check_state()
        if self.disabled_reason:
            rejection = Rejection(Reject.NOT_READY)
        else:
            rejection = reject_reason(call, self.target, self.failed)
        if rejection is None and self.debug != "numerics":
            output = None
            if (layers := self.decoder.layers_for(call)) is not None:
                output = self._replay_full_graph(call, layers)
            elif self.shadows is not None and self.shadows.takes(call) and not self._stand_in_failed(call):
                output = self._replay_on_stand_in(call)
            if output is not None:
                return output
        if rejection is None:
            bucket = pick_bucket(self.sizes, call.num_tokens)
            self._mixers_inline(call, bucket)
            try:
                graph = self._graph(call.kind, bucket)
                if graph is None:
                    rejection = Rejection(Reject.CAPTURE_FAILED if self.disabled_reason is None else Reject.NOT_READY)
                else:
                    replay = self._replay_beside_eager if self.debug == "numerics" else self._replay
                    output = replay(graph, call, bucket)
                    if not isinstance(output, Rejection):
                        return output
                    rejection = output
            finally:
                self._decode_cache = None  # the runner must not keep a caller's cache alive
        self._count_reject(rejection)
        return self.original_forward(**call.arguments)

    def _mixers_inline(self, call: Call, bucket: int) -> None:
        """A hybrid model's decode step whose mixers update their states in place: bind the cache's states to bcg's
        tensors, so the graph of this call's kind runs the mixers inside it (unless capturing that graph failed:
        then their breaks)."""
        if self.mixer_states is None or not call.is_decode_step:
            return
        states = self.mixer_states.settled(call.cache)
        if states is None:
            return
        call.mixer_states = self.mixer_states.bind(call.cache, states)
        self._free_dropped_mixer_graphs()
        if (call.kind, bucket) in self.failed:
            call.mixer_states = ""
        else:
            self._decode_cache = (call.cache, call.tokens.shape[0])

    def _count_reject(self, rejection: Rejection) -> None:
        self.stats.count_reject(rejection.reason.value)
        advice = REPEATING.get(rejection.reason)
        if advice is not None and rejection not in self._warned_rejects:
            self._warned_rejects.add(rejection)
            warnings.warn(
                f"bcg: {type(self.model).__name__} ran eagerly ({rejection.describe()}) and "
                f"will on every such call: {advice}. Counts are in handle.stats()['rejects'].",
                BcgFallbackWarning,
                stacklevel=5,
            )

    def _bind(self, args: tuple, kwargs: dict) -> Call:
        arguments = dict(zip(self._parameter_names, args))
        arguments.update(kwargs)
        extra = {k: v for k, v in arguments.items() if k not in KNOWN_ARGUMENTS and v is not None and v is not False}
        call = Call(arguments, extra, _autocast_state(self.device))
        call.fast_decode = self.fast_decode
        call.fast_padded = self.fast_decode and self.varlen_prompts
        return call

    @property
    def ready(self) -> bool:
        return self.disabled_reason is None

    # ----- capture -----
    def capture_all(self) -> None:
        """Capture every size now (prompts' graphs and, in the fast mode, decode steps' own), largest first, so
        smaller buckets reuse the pool the largest one grew."""
        kinds = ["ids", "ids/fast"] if self.fast_decode else ["ids"]
        for size in reversed(self.sizes):
            for kind in kinds:
                if self.disabled_reason is not None:
                    return
                with self._lock:
                    self._graph(kind, size)

    def _graph(self, kind: str, bucket: int) -> Graph | None:
        key = (kind, bucket)
        graph = self.graphs.get(key)
        if graph is None and key not in self.failed and self.disabled_reason is None:
            graph = self._capture(kind, bucket)
        return graph

    def _capture(self, kind: str, bucket: int) -> Graph | None:
        key = (kind, bucket)
        start = time.perf_counter()
        token = LIVE.set(capture_context(bucket))
        try:
            # Tensors made while capturing outlive the call: never inference tensors, whatever mode the caller is in.
            with torch.inference_mode(False):
                if kind.startswith("embeds") and self.static_embeds is None:
                    shape = (1, self.sizes[-1], self.config.hidden_size)
                    self.static_embeds = torch.zeros(shape, dtype=self.dtype, device=self.device)
                with self._mixer_states_kept(kind):
                    graph = self.backend.capture(partial(self._run_stack, kind, bucket))
        except StructureError as error:
            self._disable(str(error))
            return None
        except Exception as error:  # capture must never take the model down: the call runs eagerly instead
            self._capture_failed(key, error)
            return None
        finally:
            LIVE.reset(token)
        seconds = time.perf_counter() - start
        self.graphs[key] = graph
        self.stats.captured[key] = seconds
        self.stats.graph_bytes = self.backend.graph_bytes()
        self.stats.bridge_bytes = self.bridges.nbytes
        logger.info("bcg: captured %s bucket %d in %.3f s (%d breaks, graph pool %.1f MiB)",
                    kind, bucket, seconds, self.expected_breaks, self.stats.graph_bytes / 2**20)
        if self.strict_addresses and self._address_book is None:
            self._address_book = self._current_address_book()
        return graph

    def _free_dropped_mixer_graphs(self) -> None:
        """Graphs read their storage's addresses: a storage let go takes its graphs with it."""
        for tag in self.mixer_states.dropped:
            for key in [k for k in self.graphs if _mixer_states_tag(k[0]) == tag]:
                self.graphs.pop(key).free()
                self.stats.captured.pop(key, None)
            for kind in [k for k in self.slots if _mixer_states_tag(k) == tag]:
                del self.slots[kind]
        self.mixer_states.dropped.clear()

    def _mixer_states_kept(self, kind: str) -> Any:
        """A decode graph with inline mixers: its warm-up and capture runs must leave their states as they were."""
        tag = _mixer_states_tag(kind)
        return self.mixer_states.kept(tag) if tag else nullcontext()

    def _fused(self, kind: str) -> Any:
        """The fused kernels in place for one run of the stack for a graph of ``kind`` (a capture, or an eager-backend
        replay): only fast graphs (decode steps', breakable or full, and padded prompts') hold them."""
        return self.fusions.installed() if self.fusions and kind.endswith("/fast") else nullcontext()

    def _run_plain(self, kind: str, **inputs: Any) -> torch.Tensor:
        """One run of the original stack forward, attention included (a full decode graph: no breaks); a fast one's
        masked SDPA takes grouped keys/values as they are."""
        gqa = hf.masked_gqa_in_sdpa() if kind.endswith("/fast") else nullcontext()
        with torch.no_grad(), self._fused(kind), gqa:
            output = self.original_forward(**inputs)
        self.output_cls = type(output)
        return output[0]

    def _run_stack(self, kind: str, bucket: int) -> torch.Tensor:
        """One run of the original stack forward on the static inputs, attention routed through the breaks."""
        slots = self.slots.setdefault(kind, [])
        run = StackRun(slots, self.bridges, self.original_implementation, self.layer_types, self.break_fn,
                       self.mask_windows, self.layer_of)
        expected_breaks = self.expected_breaks
        if _mixer_states_tag(kind):  # the mixers run inside the graph, on the cache bound to bcg's state tensors
            if self._decode_cache is None:
                raise RuntimeError(f"bcg internal error: {kind} captured without a decode step's cache")
            run.mixer_cache, run.decode_batch = self._decode_cache
            expected_breaks -= len(self.mixers)
        if kind.startswith("ids"):
            inputs = {"input_ids": self.static_ids[:, :bucket]}
        else:
            inputs = {"inputs_embeds": self.static_embeds[:, :bucket]}
        with torch.no_grad(), run_stack_under_bcg(run, self.configs), mixers_routed(self.mixers), self._fused(kind):
            output = self.original_forward(
                **inputs, position_ids=self.static_positions[:, :bucket],
                attention_mask=None, use_cache=False, **{self.cache_argument: None},
            )
        if run.breaks != expected_breaks:
            attention = self.expected_breaks - len(self.mixers)
            raise StructureError(
                f"{run.breaks} attention / mixer calls went through bcg's breaks where its layer types promise "
                f"{attention} attention and {len(self.mixers)} mixer calls; the rest would be captured inside a "
                "graph (a layer type or mixer bcg does not know: please report it with the transformers version)"
            )
        self.output_cls = type(output)
        return output[0]

    def _capture_failed(self, key: tuple[str, int], error: Exception) -> None:
        self.failed[key] = f"{type(error).__name__}: {error}"
        self.stats.capture_failures[f"{key[0]}:{key[1]}"] = self.failed[key]
        # The traceback as text: a handler that keeps records would otherwise pin the failed run's frames and
        # their GPU tensors, and the next bucket's capture would run out of memory as well.
        logger.warning("bcg: capture of %s bucket %d failed: %s\n%s", key[0], key[1], self.failed[key],
                       "".join(traceback.format_exception(error)).rstrip())
        if not self._warned_capture:
            self._warned_capture = True
            warnings.warn(
                f"bcg: capturing {key[0]} bucket {key[1]} failed ({self.failed[key]}); calls of that size run "
                "eagerly. See handle.stats()['capture_failures'].",
                BcgCaptureWarning,
                stacklevel=6,
            )

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.free_graphs()
        warnings.warn(f"bcg: {reason}; the model stays eager", BcgFallbackWarning, stacklevel=6)

    def close(self) -> None:
        """Free the graphs and everything made for them, and stop watching the model (unwrap; a handle kept by the
        caller then holds only the stats)."""
        self.free_graphs()
        for decoder in self._decoders():
            decoder.storages.clear()
        if self.shadows is not None:
            self.shadows.clear()
        self._forget_what_graphs_were_built_with()
        self._watch.close()

    def _forget_what_graphs_were_built_with(self) -> None:
        """Slots and bridges carry the dtype, attention function and module references of the graphs they served;
        mixer states their dtype."""
        self.slots.clear()
        if self.mixer_states is not None:
            self.mixer_states.clear()
        self.bridges.buffers.clear()
        self.static_embeds = None

    def free_graphs(self) -> None:
        for decoder in self._decoders():
            decoder.free_graphs()
        self.stats.full_graphs = 0
        for graph in self.graphs.values():
            graph.free()
        self.graphs.clear()
        self.stats.captured.clear()
        self.stats.graph_bytes = 0

    # ----- addresses -----
    def _current_address_book(self) -> dict[str, tuple]:
        extra = {f"bcg.bridge.{'.'.join(map(str, key))}": t for key, t in self.bridges.buffers.items()}
        extra["bcg.static.input_ids"] = self.static_ids
        extra["bcg.static.position_ids"] = self.static_positions
        if self.static_embeds is not None:
            extra["bcg.static.inputs_embeds"] = self.static_embeds
        return addresses.address_book(addresses.tensor_slots(self.stack.module), extra)

    def _check_state(self) -> None:
        """Graphs bake in weight addresses and the attention function: if either changed, drop them (debug: raise).

        Always on: the cheap address watch. ``debug=True``: every tensor's address, every call, and an error naming
        those that moved.
        """
        if self.strict_addresses and self._address_book is not None:
            changed = addresses.changed_paths(self._address_book, self._current_address_book())
            if changed:
                addresses.raise_address_error(changed)
        implementation = hf.attention_implementation_of(self.config)
        invalidations = self.stats.invalidations
        if implementation != self.original_implementation:
            self.original_implementation = implementation
            self.configs = hf.attention_configs(self.stack.module)
            self._invalidate(f"the attention implementation changed to {implementation!r} since capture")
        elif self._watch.moved():
            self._watch.reset()
            first = next(self.stack.module.parameters())
            if first.device != self.device:
                self._disable(f"the model moved from {self.device} to {first.device} after wrapping; bcg's buffers "
                              f"and graph pool live on {self.device}: call bcg.unwrap_model(model) and wrap it again")
                return
            self.dtype = self.target.dtype = first.dtype
            self._invalidate("the model's weights moved or changed dtype since capture (to(), half(), "
                             "load_state_dict(assign=True), ...)")
        self._calls_invalidating = self._calls_invalidating + 1 if self.stats.invalidations > invalidations else 0
        if self._calls_invalidating >= _THRASHING_CALLS:
            self._disable(f"the model's weights or buffers changed on {_THRASHING_CALLS} calls in a row (its own "
                          "forward reassigns them, as CTRL's does its position encoding): graphs would be captured "
                          "anew on every call")

    def _invalidate(self, why: str) -> None:
        """Drop every graph and what was built for them; the next calls capture again under the new state."""
        if self.graphs or any(decoder.graphs for decoder in self._decoders()):
            warnings.warn(f"bcg: {why}; dropping all graphs, they are captured again on use", BcgInvalidatedWarning,
                          stacklevel=7)
            self.stats.invalidations += 1
            self.free_graphs()
        self._forget_what_graphs_were_built_with()
        self.failed.clear()
        self._address_book = None

    # ----- replay -----
    def _build_masks(self, mask: torch.Tensor | None, cache: Any, positions: torch.Tensor, batch: int,
                     seq: int) -> torch.Tensor | dict | None:
        return live_masks(self.config, mask, cache, positions, batch, seq, self.dtype, self.device,
                          self.full_masks_only)

    def _live_context(self, call: Call, bucket: int, cache: Any = None,
                      full_graph: bool = False) -> LiveContext | Rejection:
        """The call's cache (or ``cache`` standing in for it), positions and masks, made before anything touches the
        cache (so eager can still answer). ``full_graph``: a 2D padding mask (or none) is left for the graph to build
        the masks from, where this attention implementation's mask code can run inside one."""
        batch, seq = call.tokens.shape[:2]
        cache = cache if cache is not None else call.cache
        use_cache = call.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if cache is None and use_cache:
            cache = hf.new_cache(self.cache_class, self.config)
        mask = call.get("attention_mask")
        positions = call.get("position_ids")
        if positions is None:
            positions = default_position_ids(self.model_type, mask, cache, batch, seq, self.device)
            if positions is None:
                return Rejection(Reject.UNSUPPORTED_MASK, "a prepared mask, from which this model derives positions")
        positions = positions.expand(batch, seq)
        padding = mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)
        if full_graph and padding and hf.masks_build_in_graphs(self.config):
            return LiveContext(batch, seq, call.num_tokens, bucket, cache, PaddingMask(mask), positions)
        try:
            masks = self._build_masks(mask, cache, positions, batch, seq)
        except Exception as error:
            return Rejection(Reject.MASK_FAILED, f"{type(error).__name__}: {error}")
        if isinstance(masks, dict) and (missing := {s.mask_key for s in self.slots.get(call.kind, ())} - set(masks)):
            return Rejection(Reject.UNSUPPORTED_MASK, f"no mask for layer types {sorted(missing)}")
        if isinstance(masks, torch.Tensor) and masks.ndim == 2:
            return Rejection(Reject.UNSUPPORTED_MASK, "a mask layout transformers leaves to the model")
        requests = None
        if call.rows is not None and self.varlen_prompts and hf.past_length(cache) == 0:
            requests = varlen.requests_of(mask, seq)
        return LiveContext(batch, seq, call.num_tokens, bucket, cache, masks, positions, call.rows, requests)

    def _replay(self, graph: Graph, call: Call, bucket: int) -> Any | Rejection:
        live = self._live_context(call, bucket)
        if isinstance(live, Rejection):
            return live
        if call.mixer_states and (padded := self._mixers_padded(live)):
            return Rejection(Reject.UNSUPPORTED_MASK, f"a padding mask for the {padded} mixers of a decode step")
        self._fill_static(call.inputs, call.tokens, live, bucket)
        token = LIVE.set(live)
        try:
            with self.backend.replay_context(fast=call.fast):
                hidden = graph.replay()
        finally:
            LIVE.reset(token)
        self.stats.count_replay()
        # The static output is overwritten by the next replay: the caller gets its own copy.
        return hf.output_with_cache(self.output_cls, live.unpack(hidden[0, :live.num_tokens]), live.cache)

    def _mixers_padded(self, live: LiveContext) -> list[str]:
        """Mixer layer types that a decode step would hand a padding mask (inline mixers are captured without)."""
        return [key for key in self._mixer_mask_keys
                if isinstance(mask := live.mask_for(key), torch.Tensor) and mask.ndim == 2]

    def _replay_full_graph(self, call: Call, layers: list) -> Any | None:
        """A decode step on a full static cache as one graph; None: the breakable graphs take it."""
        live = self._live_context(call, bucket=call.num_tokens, full_graph=True)
        if isinstance(live, Rejection):
            return None
        hidden = self._full_graph_step(self.decoder, call, live, layers)
        return None if hidden is None else hf.output_with_cache(self.output_cls, hidden, live.cache)

    def _replay_on_stand_in(self, call: Call) -> Any | None:
        """A decode step on a dynamic cache as one graph of its static stand-in; the caller's cache then holds views of
        the stand-in's tensors. None: the breakable graphs take it (the caller's cache untouched)."""
        shadow = self.shadows.bind(call.cache)
        if shadow is None:
            return None
        live = self._live_context(call, bucket=call.num_tokens, cache=shadow.cache, full_graph=True)
        if isinstance(live, Rejection):
            return None
        hidden = self._full_graph_step(self.shadow_decoder, call, live, shadow.cache.layers)
        if hidden is None:
            return None
        self.shadows.settle(call.cache, shadow)
        return hf.output_with_cache(self.output_cls, hidden, call.cache)

    def _stand_in_failed(self, call: Call) -> bool:
        """A stand-in's full graph failed to capture for this kind and batch: its steps take the breaks, uncopied."""
        batch = call.tokens.shape[0]
        return any(key[0] == call.kind and key[1] == batch for key in self.shadow_decoder.failed)

    def _full_graph_step(self, decoder: StaticDecoder, call: Call, live: LiveContext,
                         layers: list) -> torch.Tensor | None:
        captured = len(decoder.graphs)
        hidden = decoder.replay(call, live, layers)
        if hidden is None:
            return None
        if len(decoder.graphs) != captured:
            self.stats.full_graphs = sum(len(d.graphs) for d in self._decoders())
            self.stats.graph_bytes = self.backend.graph_bytes()
        self.stats.count_replay(full_graph=True)
        return hidden

    def static_cache_bytes(self) -> int:
        """Memory of the cache tensors bcg holds for full-graph decode (its storages and the static stand-ins)."""
        tensors = [t for decoder in self._decoders() for t in decoder.tensors()]
        return held_bytes(tensors + (self.shadows.tensors() if self.shadows is not None else []))

    def _decoders(self) -> list[StaticDecoder]:
        return [self.decoder] + ([self.shadow_decoder] if self.shadow_decoder is not None else [])

    def _replay_beside_eager(self, graph: Graph, call: Call, bucket: int) -> Any | Rejection:
        """debug="numerics": replay, then run eager on a copy of the cache and record the largest difference."""
        shadow_cache = copy.deepcopy(call.cache)
        output = self._replay(graph, call, bucket)
        if not isinstance(output, Rejection):
            arguments = {k: v for k, v in call.arguments.items() if k not in hf.CACHE_ARGUMENTS}
            with torch.no_grad():
                eager = self.original_forward(**arguments, **{self.cache_argument: shadow_cache})
            difference = (output.last_hidden_state.float() - eager[0].float()).abs()
            if call.rows is not None:  # pad rows hold zeros where eager computed the pad tokens
                difference = difference.flatten(0, 1)[call.rows]
            diff = difference.max().item()
            self.stats.record_numerics(diff)
            logger.info("bcg numerics: %d tokens, max |graph - eager| = %.3e", call.num_tokens, diff)
        return output

    def _fill_static(self, inputs: str, tokens: torch.Tensor, live: LiveContext, bucket: int) -> None:
        n = live.num_tokens
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


def _mixer_states_tag(kind: str) -> str:
    """The mixer-state storage a graph kind's inline mixers read ("" when its mixers are breaks)."""
    return next((part for part in kind.split("/") if part.startswith("mixers")), "")


def _positional_parameters(forward: Any) -> list[str]:
    """Names of the arguments a caller may pass by position, in order."""
    return [name for name, p in hf.forward_parameters(forward).items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _autocast_state(device: torch.device) -> str:
    """The autocast state on the model's device type, as part of a graph key ("" when autocast is off)."""
    if not torch.is_autocast_enabled(device.type):
        return ""
    return f"autocast-{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')}"

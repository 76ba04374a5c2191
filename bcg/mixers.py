"""A module break: a stateful mixer (linear attention, SSM, convolution) or a latent-attention module runs eagerly on
the live cache, as a break of its own.

Hybrid models (Qwen3.5 / Qwen3-Next, OLMo-hybrid, Granite 4, Jamba, Bamba, Falcon-H1, LFM2) mix attention layers with
token mixers that keep per-sequence state in the cache (a convolution window, a recurrent state); multi-head latent
attention caches latents it expands after the update. Such a module is found by what it does when the stack runs once
(probe.py: it receives the cache and reads or writes it, and it is no plain attention call site), not from a list of
families or names. While a stack runs under bcg its ``forward`` is routed here: the hidden states go into an owned
bridge, the segment ends with a break, and the break body calls the module's own forward on the live
``[B, S, hidden]`` tokens with the live cache and mask (a mixer's: the 2D padding mask), then writes the result into
the output bridge the next segment reads. Every prefill / decode choice the mixer makes in Python
(``has_previous_state``, ``seq_len == 1``, lazily allocated states) therefore runs per call, never baked into a graph.
MLPs, norms and projections stay in segments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import hf, patching, probe
from .attention import ACTIVE_RUN, StackRun, StructureError, is_per_call
from .call import named_arguments, positional_parameters
from .eligibility import outside_interface_reason, uncovered_layers_reason
from .live import LIVE
from .resolve import Stack

# Arguments a mixer call may carry that differ per call: the break supplies the live ones (and the live cache).
# ``conv_mask`` is transformers' name for the 2D padding mask a stack hands a layer's convolutions beside its attention
# mask (Inkling, Qwen4-exp: its "linear_attention" mask).
_LIVE_ARGUMENTS = frozenset({"attention_mask", "use_cache", "position_ids", "conv_mask"})
# Per-token tensors the stack computes inside the graph (Zamba2's and MiniMax's mixers receive the rotary embeddings,
# Bloom's attention the residual stream it adds its output to, Inkling 2's full attention the inputs of its key and
# value projections): the break hands the module those of the bucket it replays (a CUDA graph rewrites them in place),
# laid out as the call's [B, S] tokens. Besides these and what the stack computes per call for its layers
# (hf.stack_arguments: Bloom's ALiBi biases, Inkling 2's relative distances, made anew for the live call), any other
# per-call tensor keeps the model eager: it could hold capture state.
_GRAPH_ARGUMENTS = frozenset({"position_embeddings", "residual", "key_hidden_states", "value_hidden_states"})


@dataclass
class MixerSlot:
    """One stateful mixer's call site: its bridges, its own forward, and the kwargs it was called with."""

    module: nn.Module
    layer_idx: int
    layer_type: str
    forward: Callable  # the mixer's forward as it was before bcg routed it
    cache_argument: str
    kwargs: dict  # constant kwargs from the capture call
    live_arguments: frozenset  # per-call arguments the model passed, refilled from the live context
    hidden: torch.Tensor
    out: torch.Tensor
    returns_tuple: bool = False  # the module returns (hidden, *extras): the model gets (bridge, *extras passed on)
    # arguments an earlier break returned besides its hidden states (DSA's top-k indices, shared with later layers):
    # name -> (that break's slot, index among its extras)
    fed: dict = field(default_factory=dict)
    recomputed: tuple[str, ...] = ()  # arguments the stack computes per call, taken from the live call's own
    graph_tensors: dict = field(default_factory=dict)  # bucket -> tensor arguments that graph computed
    # an attention module that is a break of its own (MLA: it caches latents): the layer's attention mask, and its
    # attention function the model's own, not bcg's (``configs`` switched back while it runs)
    attends: bool = False
    configs: list = field(default_factory=list)
    implementation: str | None = None
    mask_dict: tuple[str, ...] = ()  # the keys of the dict it takes its masks in (Zaya: hf.MASK_DICT_ENTRIES), if so

    @property
    def mask_key(self) -> str:
        """The key of the mask its ``attention_mask`` gets: the layer's attention mask, or a mixer's padding mask."""
        return hf.attention_mask_key(self.layer_type) if self.attends else hf.mixer_mask_key(self.layer_type)

    @property
    def reads_padding(self) -> bool:
        """Beside its ``attention_mask``, it takes the 2D padding mask (as ``conv_mask``, or in its mask dict)."""
        return "conv_mask" in self.live_arguments or any(hf.MASK_DICT_ENTRIES[k] == "padding" for k in self.mask_dict)

    @property
    def mask_keys(self) -> tuple[str, ...]:
        """The keys of every mask it reads: its ``attention_mask``'s, and the padding mask's where it reads it too."""
        return (self.mask_key, *((hf.mixer_mask_key(self.layer_type),) if self.reads_padding else ()))

    def run(self) -> None:
        """The module's own forward on the live tokens, cache and masks (a mixer's: the 2D padding mask)."""
        live = LIVE.get()
        kwargs = dict(self.kwargs)
        padding = _padding_mask(live.mask_for(hf.mixer_mask_key(self.layer_type))) if self.reads_padding else None
        if "attention_mask" in self.live_arguments:
            kwargs["attention_mask"] = self._attention_mask(live.mask_for(self.mask_key), padding)
        if "conv_mask" in self.live_arguments:
            kwargs["conv_mask"] = padding
        if "use_cache" in self.live_arguments:
            kwargs["use_cache"] = live.cache is not None
        if "position_ids" in self.live_arguments:
            kwargs["position_ids"] = live.position_ids
        for name, value in self.graph_tensors.get(live.bucket, {}).items():
            kwargs[name] = _relaid(value, live)
        for name, (source, index) in self.fed.items():
            kwargs[name] = live.returned[id(source)][index]
        for name in self.recomputed:
            value = live.stack_arguments[name]
            kwargs[name] = value[hf.attention_mask_key(self.layer_type)] if isinstance(value, dict) else value
        with _own_attention(self):
            result = self.forward(hidden_states=live.token_input(self.hidden), **kwargs,
                                  **{self.cache_argument: live.cache})
        if isinstance(result, tuple) and result:
            live.returned[id(self)] = result[1:]
            self.returns_tuple, result = True, result[0]
        if not isinstance(result, torch.Tensor) or result.shape[-1] != self.out.shape[-1]:
            raise StructureError(f"{type(self.module).__name__} (layer {self.layer_idx}) returned "
                                 f"{type(result).__name__}, not a hidden-size tensor bcg can bridge")
        live.write_output(self.out, result)

    def _attention_mask(self, mask: torch.Tensor | dict | None, padding: torch.Tensor | None) -> Any:
        """What its ``attention_mask`` gets: the layer's attention mask, a mixer's padding mask, or the dict of both
        (by key: hf.MASK_DICT_ENTRIES) that its layer hands it."""
        if self.mask_dict:
            return {key: mask if hf.MASK_DICT_ENTRIES[key] == "attention" else padding for key in self.mask_dict}
        return mask if self.attends else _padding_mask(mask)


@contextmanager
def _own_attention(slot: MixerSlot) -> Iterator[None]:
    """While an attention module runs as a break (also inside a capture or an eager-backend replay, where bcg's
    attention function is switched in), its attention is the model's own."""
    if not slot.attends:
        yield
        return
    token = ACTIVE_RUN.set(None)
    try:
        with hf.attention_implementation(slot.configs, slot.implementation):
            yield
    finally:
        ACTIVE_RUN.reset(token)


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """What transformers hands a mixer: the 2D padding mask, or None (a caller's prepared 4D mask says nothing a
    mixer can use: transformers gives it None then too)."""
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


@dataclass(frozen=True)
class ModuleBreaks:
    """The modules that run as breaks of their own (probe.module_breaks): stateful mixers, and attention modules that
    cache something else than what they attend to, attend under a mask of their own or go around the
    AttentionInterface (``attending``: their ids)."""

    modules: list[nn.Module] = field(default_factory=list)
    attending: frozenset[int] = frozenset()
    cache_arguments: dict[int, str] = field(default_factory=dict)  # id -> the keyword the cache reached it under
    # ids of the attention call sites that touch no cache (probe.CacheUse.cacheless_attention): no break, their
    # attention runs inside the graph, as the model calls it
    in_graph_attention: frozenset[int] = frozenset()

    @property
    def mixers_only(self) -> bool:
        """Only stateful mixers: a decode step may run them inside the graph (mixer_states.py)."""
        return not self.attending


def find_module_breaks(stack: Stack, device: torch.device) -> tuple[ModuleBreaks, str | None]:
    """The stack's module breaks, in module order, found by running it once (probe.py); and why the model must stay
    eager instead, if it must (the probe failed, or a layer that keeps mixer state showed no mixer)."""
    cache_argument = hf.cache_argument(stack.module.forward)
    try:
        uses = probe.cache_uses(stack.module, stack.config, hf.stack_cache_class(stack.module.forward), cache_argument,
                                device)
    except Exception as error:  # a model that cannot run this probe could not run bcg's capture either
        return ModuleBreaks(), (f"running the stack once to see how it uses the cache failed "
                                f"({type(error).__name__}: {error})")
    by_module = {id(use.module): use for use in uses}
    chosen = [by_module[id(m)] for m in probe.module_breaks(uses)]
    found = ModuleBreaks([use.module for use in chosen], frozenset(id(use.module) for use in chosen if use.attends),
                         {id(use.module): use.argument for use in chosen},
                         frozenset(id(use.module) for use in uses if use.cacheless_attention))
    attention = {use.module.layer_idx for use in chosen if use.attends}
    return found, (uncovered_layers_reason(stack.config, {use.module.layer_idx for use in chosen})
                   or outside_interface_reason(stack.module, stack.config, stack.num_hidden_layers, attention))


def _mixer_forward(module: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What a routed mixer's ``forward`` does inside a bcg stack run: bridge in, break, bridge out."""
    run = ACTIVE_RUN.get()
    if run is None:  # a call outside bcg's runs (another thread): the mixer as it is
        return forward(*args, **kwargs)
    kwargs = named_arguments(forward, args, kwargs)
    if len(args) > len(positional_parameters(forward)) or "hidden_states" not in kwargs:
        raise StructureError(f"{type(module).__name__} was called with positional arguments bcg cannot route")
    hidden_states = kwargs.pop("hidden_states")
    if hidden_states.shape[0] != 1:
        raise RuntimeError(f"bcg captures a flat [1, N] token run, got a batch of {hidden_states.shape[0]}")
    if run.mixer_cache is not None:
        return _decode_step_inline(module, forward, hidden_states, kwargs, run)
    slot = run.slot(module, lambda: _new_slot(run, module, forward, hidden_states, kwargs))
    if not isinstance(slot, MixerSlot):
        raise StructureError(f"{type(module).__name__} (layer {module.layer_idx}) ran as a mixer where bcg saw "
                             "attention at first capture")
    slot.graph_tensors[LIVE.get().bucket] = {k: v for k, v in kwargs.items()
                                             if k in _GRAPH_ARGUMENTS and v is not None}
    n = hidden_states.shape[1]
    slot.hidden[:n].copy_(hidden_states[0])
    run.break_fn(slot)
    # A copy: the next mixer's break rewrites the shared output bridge, and a module may hold this output across it
    # (Inkling's attention runs one short convolution for its keys, then another for its values).
    output = slot.out[:n].unsqueeze(0).clone()
    return (output, *_passed_on(slot)) if slot.returns_tuple else output


class BreakReturned(torch.Tensor):
    """A tensor a module break returned besides its hidden states, as the stack's captured code sees it: that code may
    hand it on to a later break (which gets the live one), and may read its shape, but any computation on it would be
    baked into a graph with this run's values, so it raises and the model stays eager."""

    source: tuple[MixerSlot, int]

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in _METADATA:
            slot, _ = args[0].source if args and isinstance(args[0], BreakReturned) else (None, None)
            where = f" of {type(slot.module).__name__} (layer {slot.layer_idx})" if slot is not None else ""
            raise StructureError(f"the stack computes on a tensor a module break{where} returned ({func.__name__}), "
                                 "which a graph would replay with stale values")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


_METADATA = frozenset({torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
                       torch.Tensor.ndim.__get__, torch.Tensor.size, torch.Tensor.dim})


def _passed_on(slot: MixerSlot) -> tuple:
    """What the model gets besides the hidden states from a module break: what the module returned this run, each
    tensor as a ``BreakReturned`` that later breaks map back to the live one."""
    passed = []
    for index, value in enumerate(LIVE.get().returned.get(id(slot), ())):
        if is_per_call(value):  # a weight it returns (GPT-NeoX-Japanese's attention bias) is no per-call value
            value = value.as_subclass(BreakReturned)
            value.source = (slot, index)
        passed.append(value)
    return tuple(passed)


def _decode_step_inline(module: nn.Module, forward: Callable, hidden_states: torch.Tensor, kwargs: dict,
                        run: StackRun) -> Any:
    """A decode step's mixer inside the graph: its own forward on the first ``decode_batch`` rows as ``[B, 1, hidden]``,
    with the cache bound to bcg's state tensors (updated in place) and what transformers hands a mixer in a decode
    step (no padding mask: the stack gives None once the cache holds a past)."""
    batch = run.decode_batch
    cache_argument = run.module_breaks.cache_arguments[id(module)]
    arguments = {k: _decode_layout(v, batch, hidden_states.shape[1], module) for k, v in kwargs.items()
                 if k not in _LIVE_ARGUMENTS and k != cache_argument}
    arguments.update({name: None for name in ("attention_mask", "conv_mask") if name in kwargs})
    if "use_cache" in kwargs:
        arguments["use_cache"] = True
    if "position_ids" in kwargs:
        arguments["position_ids"] = _decode_layout(kwargs["position_ids"], batch, hidden_states.shape[1], module)
    result = forward(hidden_states=hidden_states[0, :batch].unsqueeze(1), **arguments,
                     **{cache_argument: run.mixer_cache})
    returns_tuple = isinstance(result, tuple) and bool(result)
    step = result[0] if returns_tuple else result
    output = hidden_states.clone()  # the flat run's rows beyond the batch keep their (harmless) pad values
    output[0, :batch] = step[:, 0]
    return (output, None) if returns_tuple else output


def _decode_layout(value: Any, batch: int, tokens: int, module: nn.Module) -> Any:
    """A tensor argument the graph computed per token of its flat run (``[1, tokens, ...]``) as the decode step's
    ``[B, 1, ...]``; other values as they are."""
    if isinstance(value, dict):
        return {k: _decode_layout(v, batch, tokens, module) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_decode_layout(v, batch, tokens, module) for v in value)
    if not is_per_call(value):
        return value
    if not _per_token(value, tokens):
        raise RuntimeError(f"{type(module).__name__} (layer {module.layer_idx}) takes a per-call tensor of shape "
                           f"{tuple(value.shape)} that bcg cannot lay out for a decode step")
    return value[0, :batch].unsqueeze(1)


def _new_slot(run: StackRun, module: nn.Module, forward: Callable, hidden_states: torch.Tensor,
              kwargs: dict) -> MixerSlot:
    cache_argument = run.module_breaks.cache_arguments[id(module)]
    live = _LIVE_ARGUMENTS | {cache_argument}
    fed = {k: v.source for k, v in kwargs.items() if isinstance(v, BreakReturned)}
    per_call = sorted(k for k, v in kwargs.items() if k not in live and k not in fed and is_per_call(v))
    recomputed = tuple(k for k in per_call if k in LIVE.get().stack_arguments)
    unsupplied = [k for k in per_call if k not in recomputed
                  and (k not in _GRAPH_ARGUMENTS or not _per_token(kwargs[k], hidden_states.shape[1]))]
    if unsupplied:
        raise StructureError(f"{type(module).__name__} (layer {module.layer_idx}) takes {unsupplied} per call, which "
                             "bcg's mixer break cannot supply")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict) and (unknown := sorted(set(mask) - set(hf.MASK_DICT_ENTRIES))):
        raise StructureError(f"{type(module).__name__} (layer {module.layer_idx}) takes its masks in a dict, and bcg "
                             f"does not know which masks its keys {unknown} hold")
    if not isinstance(mask, torch.Tensor | dict | None):
        raise StructureError(f"{type(module).__name__} (layer {module.layer_idx}) takes its attention mask as a "
                             f"{type(mask).__name__}, where bcg's break hands it the layer's mask tensor")
    width, dtype = hidden_states.shape[-1], hidden_states.dtype
    return MixerSlot(
        module=module,
        attends=id(module) in run.module_breaks.attending,
        configs=run.configs,
        implementation=run.original_implementation,
        layer_idx=module.layer_idx,
        layer_type=run.layer_type(module.layer_idx),
        forward=forward,
        cache_argument=cache_argument,
        kwargs={k: v for k, v in kwargs.items() if k not in live and not is_per_call(v)},
        fed=fed,
        recomputed=recomputed,
        live_arguments=frozenset(kwargs) & _LIVE_ARGUMENTS,
        mask_dict=tuple(mask) if isinstance(mask, dict) else (),
        hidden=run.bridges.get("hidden", (width,), dtype),
        out=run.bridges.get("out", (width,), dtype),
    )


def _relaid(value: Any, live: Any) -> Any:
    """A graph-computed per-token argument (tensors ``[1, bucket, ...]``, checked at first capture) in the live
    call's ``[B, S]`` layout."""
    if isinstance(value, dict):
        return {k: _relaid(v, live) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_relaid(v, live) for v in value)
    return live.relayout(value)


def _per_token(value: Any, tokens: int) -> bool:
    """Every tensor in ``value`` is laid out ``[1, tokens, ...]``, as the flat token run the graph computes."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_per_token(v, tokens) for v in value)
    return isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (1, tokens)


def padded_mixer_types(mixers: list[nn.Module], layer_types: list[str] | None, live: Any) -> list[str]:
    """Mixer layer types that a decode step would hand a padding mask (inline mixers are captured without)."""
    keys = sorted({hf.mixer_mask_key(layer_types[m.layer_idx]) for m in mixers}) if layer_types else []
    return [k for k in keys if isinstance(mask := live.mask_for(k), torch.Tensor) and mask.ndim == 2]


def mixers_routed(mixers: list[nn.Module]) -> AbstractContextManager:
    """Each mixer's ``forward`` routed through a break for the duration (one stack run), then as it was."""
    # module.forward: the instance's own (an accelerate hook's) or the class's, bound; the break calls it
    return patching.forwards_replaced({
        module: partial(_mixer_forward, module, module.forward) for module in mixers})

"""What a stack's modules do with the cache, seen by running the stack once: how bcg finds its stateful mixers.

transformers moves the code that touches a mixer's state from release to release (5.25 moved the hybrids' causal
convolution into a module-level ``causal_conv1d_forward``), so names in a class's code say little. Instead bcg runs the
stack's own forward eagerly on a two-token prompt and a one-token step, with a cache whose every attribute access is
recorded against the innermost module running at that moment, and with an attention function that records which
modules call it, with which keys and which mask. A module whose own code reads or writes the cache, that received the
cache as an argument, and that is not a plain attention call site (one that attends to the keys its cache update
returned, under the mask it was handed) runs as a break of its own: a stateful mixer, an attention module that caches
compressed latents (MLA), or one that attends under a mask of its own making (a sparse selection, a dynamic mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import hf
from .attention import per_call_arguments
from .call import named_arguments

PROBE_ATTENTION_NAME = "bcg_probe"


@dataclass
class CacheUse:
    """One module's dealings with the cache during the probe."""

    module: nn.Module
    argument: str | None = None  # the parameter of its forward the cache arrived under (None: not passed to it)
    touched: set[str] = field(default_factory=set)  # cache attributes its own code used (not its submodules')
    calls_attention: bool = False  # it called the attention function (an AttentionInterface call site)
    updates_keys_values: bool = False  # it updated the cache's keys and values itself (attention, in or outside it)
    # its attention read keys/values other than the ones its cache update returned (multi-head latent attention
    # caches compressed latents and expands them after): attention's break would cache the wrong tensors
    attends_elsewhere: bool = False
    # its attention got inputs of the module's own making: another mask than the one it was handed (an indexer's top-k
    # selection folded in, a dynamic mask) or other tensors computed per call (the selection itself); attention's
    # break would hand the attention function the layer's mask and capture-time tensors instead
    own_attention_inputs: bool = False
    _updated: list = field(default_factory=list, repr=False)  # what its cache updates returned
    _handed_mask: Any = field(default=None, repr=False)  # the attention mask of its latest call

    @property
    def plain_attention(self) -> bool:
        """An AttentionInterface call site whose cache update and attention bcg's attention break can make in its
        place."""
        return self.calls_attention and not self.attends_elsewhere and not self.own_attention_inputs

    @property
    def cacheless_attention(self) -> bool:
        """An AttentionInterface call site that never received, read or wrote the cache: attention over tensors of the
        module's own making (Inkling 2's over its layers' block states), as capturable as the rest of the layer."""
        return self.calls_attention and self.argument is None and not self.touched and not self.updates_keys_values

    @property
    def attends(self) -> bool:
        """Attention: it called the attention function, or updated the cache's keys and values (attention outside the
        AttentionInterface, as Bloom's); it reads the layer's attention mask, not a mixer's padding mask."""
        return self.calls_attention or self.updates_keys_values


@dataclass
class _Recorder:
    stack: nn.Module | None
    cache: Any = None
    running: list[nn.Module] = field(default_factory=list)
    uses: dict[int, CacheUse] = field(default_factory=dict)

    def use(self, module: nn.Module) -> CacheUse:
        return self.uses.setdefault(id(module), CacheUse(module))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.running.append(module)
        if module is not self.stack and self.cache is not None:
            arguments = named_arguments(module.forward, args, kwargs)
            argument = next((name for name, value in arguments.items() if value is self.cache), None)
            if argument is not None:
                use = self.use(module)
                use.argument, use._handed_mask = argument, arguments.get("attention_mask")

    def after(self, module: nn.Module, *_: Any) -> None:
        if self.running and self.running[-1] is module:
            self.running.pop()

    def touched(self, name: str) -> None:
        if self.running and self.running[-1] is not self.stack:
            self.use(self.running[-1]).touched.add(name)

    def updated(self, result: Any) -> None:
        """A cache update's (keys, values) as the module that made it got them back."""
        if self.running and self.running[-1] is not self.stack:
            use = self.use(self.running[-1])
            use.updates_keys_values = True
            use._updated.extend(t for t in result if isinstance(t, torch.Tensor))


def _spied(cache: Any, recorder: _Recorder) -> None:
    """Make ``cache`` report every attribute its users read (its class becomes a recording subclass of its own)."""
    klass = type(cache)

    def __getattribute__(self: Any, name: str) -> Any:
        if not name.startswith("__"):
            recorder.touched(name)
        value = object.__getattribute__(self, name)
        if name == "update" and callable(value):
            return _recording_update(value, recorder)
        return value

    cache.__class__ = type(klass.__name__, (klass,), {"__getattribute__": __getattribute__,
                                                       "__module__": klass.__module__})


def _recording_update(update: Callable, recorder: _Recorder) -> Callable:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = update(*args, **kwargs)
        recorder.updated(result if isinstance(result, tuple) else (result,))
        return result

    return recorded


@contextmanager
def _hooks(stack: nn.Module, recorder: _Recorder) -> Iterator[None]:
    handles = []
    for module in stack.modules():
        handles.append(module.register_forward_pre_hook(recorder.before, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.after, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recording_attention(recorder: _Recorder, original: str | None) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                  **kwargs: Any) -> Any:
        use = recorder.use(module)
        use.calls_attention = True
        if use._updated and not any(key is t for t in use._updated):
            use.attends_elsewhere = True
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[0] if args else None
        if mask is not use._handed_mask or per_call_arguments(kwargs):
            use.own_attention_inputs = True
        return hf.attention_function(original, module)(module, query, key, value, *args, **kwargs)

    return attention


def cache_uses(stack: nn.Module, config: Any, cache_class: type, cache_argument: str,
               device: torch.device) -> list[CacheUse]:
    """Run the stack's own forward on a 2-token prompt and a 1-token step (token id 0) with a recording cache; every
    module that received the cache, touched it or called attention, in module order."""
    recorder = _Recorder(stack)
    implementation = hf.attention_implementation_of(config)
    hf.register_attention(PROBE_ATTENTION_NAME, _recording_attention(recorder, implementation), implementation)
    cache = hf.new_cache(cache_class, config)
    _spied(cache, recorder)
    recorder.cache = cache
    try:
        with torch.no_grad(), _hooks(stack, recorder), hf.attention_implementation(hf.attention_configs(stack),
                                                                                    PROBE_ATTENTION_NAME):
            for tokens in (2, 1):
                ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
                stack(input_ids=ids, use_cache=True, **{cache_argument: cache})
        order = {id(module): i for i, module in enumerate(stack.modules())}
        uses = sorted(recorder.uses.values(), key=lambda use: order.get(id(use.module), len(order)))
    finally:
        # The registered attention function outlives the probe: it must not keep this model or its cache alive.
        recorder.uses, recorder.cache, recorder.running, recorder.stack = {}, None, [], None
    for use in uses:
        use._updated.clear()  # the probe's tensors
        use._handed_mask = None
    return uses


def module_breaks(uses: list[CacheUse]) -> list[nn.Module]:
    """The modules that must run eagerly as a break of their own: their own code touched the cache, they received it
    as an argument, and they are no plain attention call site (whose cache update bcg's attention break makes in their
    place) nor hold one (its break would run inside theirs): stateful mixers, and attention that caches something else
    than what it attends to, attends under a mask of its own or goes around the AttentionInterface. Such an attention
    module runs whole, with the modules inside it that touch the cache too (a sparse-attention indexer); otherwise the
    innermost where one holds another (a layer whose own code touches its mixer's state stays captured around it)."""
    plain = {id(use.module) for use in uses if use.plain_attention}
    candidates = [use for use in uses
                  if use.touched and use.argument is not None and not use.plain_attention
                  and isinstance(getattr(use.module, "layer_idx", None), int)
                  and not isinstance(use.module.layer_idx, bool)
                  and not any(id(sub) in plain for sub in use.module.modules())]
    inside_attention = {id(sub) for use in candidates if use.attends
                        for sub in use.module.modules() if sub is not use.module}
    modules = [use.module for use in candidates if id(use.module) not in inside_attention]
    found = {id(module) for module in modules}
    return [module for module in modules
            if not any(id(sub) in found for sub in module.modules() if sub is not module)]

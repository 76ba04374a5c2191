"""What a stack's modules do with the cache, seen by running the stack once: how bcg finds its stateful mixers.

transformers moves the code that touches a mixer's state from release to release (5.25 moved the hybrids' causal
convolution into a module-level ``causal_conv1d_forward``), so names in a class's code say little. Instead bcg runs the
stack's own forward eagerly on a two-token prompt and a one-token step, with a cache whose every attribute access is
recorded against the innermost module running at that moment, and with an attention function that records which
modules call it. A module whose own code reads or writes the cache, that received the cache as an argument, and that
is not an attention call site, is a stateful mixer: its forward becomes a break.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import hf

PROBE_ATTENTION_NAME = "bcg_probe"


@dataclass
class CacheUse:
    """One module's dealings with the cache during the probe."""

    module: nn.Module
    argument: str | None = None  # the parameter of its forward the cache arrived under (None: not passed to it)
    touched: set[str] = field(default_factory=set)  # cache attributes its own code used (not its submodules')
    calls_attention: bool = False  # it called the attention function (an AttentionInterface call site)


@dataclass
class _Recorder:
    stack: nn.Module
    cache: Any = None
    running: list[nn.Module] = field(default_factory=list)
    uses: dict[int, CacheUse] = field(default_factory=dict)

    def use(self, module: nn.Module) -> CacheUse:
        return self.uses.setdefault(id(module), CacheUse(module))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.running.append(module)
        if module is not self.stack and self.cache is not None:
            argument = _argument_holding(module, self.cache, args, kwargs)
            if argument is not None:
                self.use(module).argument = argument

    def after(self, module: nn.Module, *_: Any) -> None:
        if self.running and self.running[-1] is module:
            self.running.pop()

    def touched(self, name: str) -> None:
        if self.running and self.running[-1] is not self.stack:
            self.use(self.running[-1]).touched.add(name)


def _argument_holding(module: nn.Module, cache: Any, args: tuple, kwargs: dict) -> str | None:
    for name, value in kwargs.items():
        if value is cache:
            return name
    if any(value is cache for value in args):
        try:
            bound = inspect.signature(module.forward).bind_partial(*args)
        except TypeError:
            return None
        return next((name for name, value in bound.arguments.items() if value is cache), None)
    return None


def _spied(cache: Any, recorder: _Recorder) -> None:
    """Make ``cache`` report every attribute its users read (its class becomes a recording subclass of its own)."""
    klass = type(cache)

    def __getattribute__(self: Any, name: str) -> Any:
        if not name.startswith("__"):
            recorder.touched(name)
        return object.__getattribute__(self, name)

    cache.__class__ = type(klass.__name__, (klass,), {"__getattribute__": __getattribute__,
                                                       "__module__": klass.__module__})


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
    def attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        recorder.use(module).calls_attention = True
        return hf.attention_function(original, module)(module, *args, **kwargs)

    return attention


def cache_uses(stack: nn.Module, config: Any, cache_class: type, cache_argument: str,
               device: torch.device) -> list[CacheUse]:
    """Run the stack's own forward on a 2-token prompt and a 1-token step (token id 0) with a recording cache; every
    module that received the cache, touched it or called attention, in module order."""
    recorder = _Recorder(stack)
    implementation = hf.attention_implementation_of(config)
    hf.register_attention(PROBE_ATTENTION_NAME, _recording_attention(recorder, implementation))
    cache = hf.new_cache(cache_class, config)
    _spied(cache, recorder)
    recorder.cache = cache
    with torch.no_grad(), _hooks(stack, recorder), hf.attention_implementation(hf.attention_configs(stack),
                                                                                PROBE_ATTENTION_NAME):
        for tokens in (2, 1):
            ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
            stack(input_ids=ids, use_cache=True, **{cache_argument: cache})
    order = {id(module): i for i, module in enumerate(stack.modules())}
    return sorted(recorder.uses.values(), key=lambda use: order.get(id(use.module), len(order)))


def stateful_mixers(uses: list[CacheUse]) -> list[nn.Module]:
    """The modules whose own code touched the cache, that received it as an argument, and that are not attention call
    sites (whose cache update bcg's attention break makes); the innermost where one holds another."""
    candidates = [use.module for use in uses
                  if use.touched and use.argument is not None and not use.calls_attention
                  and isinstance(getattr(use.module, "layer_idx", None), int)
                  and not isinstance(use.module.layer_idx, bool)]
    found = {id(module) for module in candidates}
    return [module for module in candidates
            if not any(id(sub) in found for sub in module.modules() if sub is not module)]

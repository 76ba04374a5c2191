"""One call of the patched stack forward, as the caller made it: its arguments by name, read-only."""

from __future__ import annotations

from typing import Any

import torch

from . import hf


class Call:
    """The arguments of one stack forward call, by name (read-only); ``extra`` holds the ones bcg does not know."""

    __slots__ = ("arguments", "extra", "autocast", "experts", "cache", "tokens", "is_decode_step")

    def __init__(self, arguments: dict[str, Any], extra: dict[str, Any] | None = None, autocast: str = "",
                 experts: str | None = None) -> None:
        self.arguments = arguments
        self.extra = extra if extra is not None else {}
        self.autocast = autocast  # the autocast state the call runs under ("" when off): graphs are captured per state
        self.experts = experts  # the MoE experts implementation it runs under (None: no switchable experts)
        # Read several times by every step's plan: worked out once. The KV cache, under whichever name the caller
        # used (``cache`` or the older ``past_key_values``):
        self.cache = next((arguments[n] for n in hf.CACHE_ARGUMENTS if arguments.get(n) is not None), None)
        ids = arguments.get("input_ids")
        self.tokens: torch.Tensor | None = ids if ids is not None else arguments.get("inputs_embeds")
        # one token per sequence on top of a cache: a generation step (a one-token prompt is not one)
        tokens = self.tokens
        self.is_decode_step = (self.cache is not None and isinstance(tokens, torch.Tensor) and tokens.ndim >= 2
                               and tokens.shape[1] == 1)

    def get(self, name: str) -> Any:
        return self.arguments.get(name)

    @property
    def inputs(self) -> str:
        return "ids" if self.get("input_ids") is not None else "embeds"

    def with_cache(self, cache: Any) -> Call:
        """The same call on another cache (under the caller's argument name)."""
        old = self.cache
        return Call({name: cache if value is old and old is not None else value
                     for name, value in self.arguments.items()}, self.extra, self.autocast, self.experts)


def bind_call(parameter_names: list[str], args: tuple, kwargs: dict, known: frozenset[str],
              device: torch.device, experts: str | None = None) -> Call:
    """A stack forward's arguments by name (``parameter_names``: those a caller may pass by position); those not in
    ``known`` and set go to ``extra``; the autocast state on the model's device type, the experts implementation."""
    arguments = dict(zip(parameter_names, args))
    arguments.update(kwargs)
    extra = {k: v for k, v in arguments.items() if k not in known and v is not None and v is not False}
    return Call(arguments, extra, _autocast_state(device), experts)


def named_arguments(forward: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name: its positional ones bound to ``forward``'s parameters in order, and its keyword
    ones."""
    return {**dict(zip(positional_parameters(forward), args)), **kwargs}


def positional_parameters(forward: Any) -> list[str]:
    """Names of the arguments a caller may pass by position, in order."""
    return [name for name, p in hf.forward_parameters(forward).items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _autocast_state(device: torch.device) -> str:
    """The autocast state on the model's device type, as part of a graph key ("" when autocast is off)."""
    if not torch.is_autocast_enabled(device.type):
        return ""
    return f"autocast-{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')}"

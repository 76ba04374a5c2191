"""Is the model still what its graphs were captured from? Checked before every call.

Graphs bake in weight addresses, dtypes and the attention function. A change the runner can honour (weights moved
or cast in place, another attention implementation) invalidates the graphs: they are captured again on use. One it
cannot (the model moved to another device; a model whose own forward reassigns its tensors on every call) disables
the runner: the model stays eager. ``debug=True`` also records every tensor's address after a capture and raises
naming those that moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import addresses

_THRASHING_CALLS = 3  # calls in a row that each invalidate the graphs: the model changes itself, bcg steps aside


@dataclass(frozen=True)
class Change:
    why: str
    fatal: bool = False  # the runner cannot follow: the model stays eager


class StateWatch:
    """What the graphs were captured from, and whether it changed since."""

    def __init__(self, module: nn.Module, read_implementation: Callable[[], str | None], strict: bool,
                 bcg_buffers: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.module = module
        self.strict = strict  # debug=True: every tensor's address, every call
        self.bcg_buffers = bcg_buffers
        first = next(module.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._read_implementation = read_implementation  # the stack config's attention implementation (eligibility)
        self.implementation = self._read_implementation()
        self._watch = addresses.AddressWatch(module)
        self._book: dict[str, tuple] | None = None
        self._changing_calls = 0

    def captured(self) -> None:
        """A graph was captured: in strict mode, record what every graph reads (once)."""
        if self.strict and self._book is None:
            self._book = self._current_book()

    def check(self) -> Change | None:
        """The change since the graphs were captured, or None; strict mode raises naming the tensors that moved."""
        if self._book is not None:
            changed = addresses.changed_paths(self._book, self._current_book())
            if changed:
                addresses.raise_address_error(changed)
        implementation = self._read_implementation()
        if implementation != self.implementation:
            self.implementation = implementation
            return Change(f"the attention implementation changed to {implementation!r} since capture")
        if not self._watch.moved():
            return None
        self._watch.reset()
        first = next(self.module.parameters())
        if first.device != self.device:
            return Change(f"the model moved from {self.device} to {first.device} after wrapping; bcg's buffers and "
                          f"graph pool live on {self.device}: call bcg.unwrap_model(model) and wrap it again", True)
        self.dtype = first.dtype
        return Change("the model's weights moved or changed dtype since capture (to(), half(), "
                      "load_state_dict(assign=True), ...)")

    def invalidated(self, dropped_graphs: bool) -> Change | None:
        """After a call's check: graphs dropped on too many calls in a row is a model that changes itself."""
        self._book = None
        self._changing_calls = self._changing_calls + 1 if dropped_graphs else 0
        if self._changing_calls >= _THRASHING_CALLS:
            return Change(f"the model's weights or buffers changed on {_THRASHING_CALLS} calls in a row (its own "
                          "forward reassigns them, as CTRL's does its position encoding): graphs would be captured "
                          "anew on every call", True)
        return None

    def settled(self) -> None:
        """A call found nothing changed."""
        self._changing_calls = 0

    def close(self) -> None:
        self._watch.close()

    def _current_book(self) -> dict[str, tuple]:
        return addresses.address_book(addresses.tensor_slots(self.module), self.bcg_buffers())

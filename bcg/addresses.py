"""Address checks: graphs read weights, bridges and static inputs by address, so a moved tensor must be noticed.

``AddressWatch`` is the cheap check run before every replay: a sample of the stack's tensors (a move, cast or
``to()`` changes them all) plus torch's registration hooks, which see any parameter, buffer or submodule assigned
anew (``load_state_dict(assign=True)``, ``module.weight = ...``). ``address_book`` records every tensor a graph reads
by name, and ``changed_paths`` names those that moved (``debug=True`` walks it on every call and raises).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .errors import BcgAddressError

_SAMPLE = 64  # tensors fingerprinted per call: enough to see a whole-model move, cheap enough for every replay
_data_ptr = torch.Tensor.data_ptr


def tensor_slots(module: nn.Module) -> list[tuple[str, dict, str]]:
    """(path, owner dict, key) for every parameter and buffer, read live so reassigned tensors are seen."""
    slots = []
    for prefix, sub in module.named_modules():
        for store in (sub._parameters, sub._buffers):
            for name in store:
                slots.append((f"{prefix}.{name}" if prefix else name, store, name))
    return slots


def fingerprint(slots: list[tuple[str, dict, str]]) -> list:
    """Storage address and dtype of each slot's current tensor (a move to another device changes the address); a
    list comprehension, as it runs before every replay."""
    return [None if (t := store[name]) is None else (t.data_ptr(), t.dtype) for _, store, name in slots]


class AddressWatch:
    """Says cheaply whether the stack's tensors may have moved since ``reset()``; a False is never wrong for
    moves, casts and reassignments (an in-place ``param.data = ...`` on one unsampled tensor needs ``debug=True``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.reset()
        _WATCHES.add(self)
        _install_hooks()

    def reset(self) -> None:
        slots = tensor_slots(self.module)
        step = max(1, -(-len(slots) // _SAMPLE))
        self.sample = [(store, name) for _, store, name in slots[::step] + slots[-1:] if store[name] is not None]
        self.module_ids = {id(m) for m in self.module.modules()}
        self.recorded = self._addresses()
        self.reassigned = False

    def moved(self) -> bool:
        if self.reassigned:
            return True
        try:
            return self._addresses() != self.recorded
        except (TypeError, AttributeError):  # a slot emptied by writing its dict directly
            return True

    def _addresses(self) -> list[int]:
        """The sampled slots' storage addresses, read live: a move or cast (``param.data = ...``) changes them, and so
        does a tensor put in a slot by writing the module's dict directly (torch's ``_apply`` may, and accelerate
        does), which no registration hook sees. Addresses alone: a cast allocates while the old tensor lives."""
        return [_data_ptr(store[name]) for store, name in self.sample]

    def close(self) -> None:
        _WATCHES.discard(self)


_WATCHES: weakref.WeakSet[AddressWatch] = weakref.WeakSet()
_HOOKS: list[Any] = []


def _on_registration(module: nn.Module, name: str, value: Any) -> None:
    for watch in list(_WATCHES):
        if id(module) in watch.module_ids:
            watch.reassigned = True


def _install_hooks() -> None:
    """One process-wide hook per kind (torch has no per-module registration hooks); watches are held weakly."""
    if not _HOOKS:
        _HOOKS.extend([
            torch_module.register_module_parameter_registration_hook(_on_registration),
            torch_module.register_module_buffer_registration_hook(_on_registration),
            torch_module.register_module_module_registration_hook(_on_registration),
        ])


def address_book(slots: list[tuple[str, dict, str]], extra: dict) -> dict[str, tuple]:
    """Name -> (address, dtype) for model tensors and bcg's own buffers (bridges, static inputs)."""
    book = {path: entry for (path, _, _), entry in zip(slots, fingerprint(slots))}
    for name, tensor in extra.items():
        book[name] = (tensor.data_ptr(), tensor.dtype)
    return book


def changed_paths(recorded: dict[str, tuple], current: dict[str, tuple]) -> list[str]:
    paths = [p for p, entry in recorded.items() if current.get(p) != entry]
    return paths + [p for p in current if p not in recorded]


def raise_address_error(paths: list[str]) -> None:
    shown = "\n  ".join(paths[:50]) + (f"\n  ... and {len(paths) - 50} more" if len(paths) > 50 else "")
    raise BcgAddressError(
        f"bcg debug: {len(paths)} tensor(s) read by captured graphs changed address since capture:\n  {shown}\n"
        "The model was moved, cast or had weights replaced after wrapping; call bcg.unwrap_model(model) and "
        "wrap again, or run with debug=False to recapture automatically."
    )

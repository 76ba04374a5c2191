"""Address checks: graphs read weights, bridges and static inputs by address, so a moved tensor must be noticed.

``fingerprint`` is the cheap check run before every replay; ``address_book`` records every tensor a graph reads
by name, and ``changed_paths`` names those that moved (``debug=True`` raises with that list).
"""

from __future__ import annotations

from torch import nn

from .errors import BcgAddressError


def tensor_slots(module: nn.Module) -> list[tuple[str, dict, str]]:
    """(path, owner dict, key) for every parameter and buffer, read live so reassigned tensors are seen."""
    slots = []
    for prefix, sub in module.named_modules():
        for store in (sub._parameters, sub._buffers):
            for name in store:
                slots.append((f"{prefix}.{name}" if prefix else name, store, name))
    return slots


def fingerprint(slots: list[tuple[str, dict, str]]) -> tuple:
    """Storage address and dtype of each slot's current tensor (a move to another device changes the address)."""
    return tuple(None if (t := store[name]) is None else (t.data_ptr(), t.dtype) for _, store, name in slots)


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

"""Instance attributes bcg sets over a class's own methods: the stack's ``forward`` and generate()'s compile check.

A copy or a pickle of a wrapped model must be a working plain model, never a second owner of the same graphs (whose
addresses point at the original's weights): each patch reduces to the class's own method bound to the copy, and the
handle to nothing, so ``copy.deepcopy``, ``pickle`` and ``torch.save`` give an unwrapped model. Wrap the copy anew.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class InstancePatch:
    """Calls ``replacement`` in place of ``type(owner).<name>``; copied or pickled, it is that class method again."""

    def __init__(self, owner: Any, name: str, replacement: Callable) -> None:
        self.owner, self.name, self.replacement = owner, name, replacement

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.replacement(*args, **kwargs)

    def __reduce__(self) -> tuple:
        # Rebuilt while the copy's own attributes are not set yet: getattr finds the class's method, bound to it.
        return getattr, (self.owner, self.name)


def patch(owner: Any, name: str, replacement: Callable) -> None:
    setattr(owner, name, InstancePatch(owner, name, replacement))


def is_patched(owner: Any, name: str) -> bool:
    return isinstance(owner.__dict__.get(name), InstancePatch)


@contextmanager
def forwards_replaced(replacements: dict[Any, Callable]) -> Iterator[None]:
    """Each module's ``forward`` replaced for the duration of one stack run, then as it was (an instance ``forward``
    set before, such as an accelerate hook's, comes back)."""
    saved = [(module, module.__dict__.get("forward")) for module in replacements]
    for module, forward in replacements.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, instance_forward in saved:
            if instance_forward is None:
                del module.forward
            else:
                module.forward = instance_forward


def dropped() -> None:
    """What a pickled or copied bcg handle becomes."""
    return None

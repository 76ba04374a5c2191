"""Reading config attributes on the per-call path.

transformers' configs override ``__getattribute__`` in Python (attribute aliases, per-layer overrides): every read
costs 1-2 µs, and a decode step reads several (the output flags, the attention implementation). A reader made once
reads the instance's ``__dict__`` directly where that provably gives what ``getattr`` gives, and ``getattr`` otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import FunctionType
from typing import Any

_ABSENT = object()


def _returns_own_attribute(self):  # the shape of transformers' plain property getters: ``return self._name``
    return self._name


def _returned_attribute(getter: Any) -> str | None:
    """The attribute a property getter returns unchanged (``return self._x``), or None for any other getter."""
    if not isinstance(getter, FunctionType):
        return None
    code, template = getter.__code__, _returns_own_attribute.__code__
    if (code.co_code, code.co_argcount, len(code.co_names)) != (template.co_code, template.co_argcount, 1):
        return None
    return code.co_names[0]


def attribute_reader(config: Any, name: str, default: Any = None) -> Callable[[], Any]:
    """A function returning ``getattr(config, name, default)`` as it is at each call."""
    cls = type(config)
    values = object.__getattribute__(config, "__dict__")
    # an alias, or a config with per-layer attributes (5.25's heterogeneous configs): only transformers' own lookup
    # resolves them
    if name in getattr(cls, "attribute_map", {}) or values.get("_heterogeneity_spec") is not None:
        return lambda: getattr(config, name, default)
    static = inspect.getattr_static(cls, name, _ABSENT)
    if isinstance(static, property):
        field = _returned_attribute(static.fget)
        if field is None or field in getattr(cls, "attribute_map", {}):
            return lambda: getattr(config, name, default)
        name, static = field, inspect.getattr_static(cls, field, _ABSENT)
    if static is not _ABSENT and hasattr(type(static), "__get__"):  # another descriptor computes it
        return lambda: getattr(config, name, default)

    def read() -> Any:
        value = values.get(name, _ABSENT)
        return value if value is not _ABSENT else getattr(cls, name, default)

    return read

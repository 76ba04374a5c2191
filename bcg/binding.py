"""Binding a caller's cache to tensors bcg owns: how one graph serves every cache of a shape.

A CUDA graph reads fixed addresses, and every ``generate()`` call makes a new cache. So bcg owns one set of tensors
per shape signature (a *storage*) and binds each caller's cache to it: the cache's contents are copied in and its
layers then point at bcg's tensors (or views of them), so the next step copies nothing. Three things are bound this
way: a caller's StaticCache (full-graph decode), a DynamicCache through the static stand-in bcg keeps for it
(``static_cache=True``), and a hybrid's mixer states (decode graphs with the mixers inside). ``Bindings`` is the one
mechanism: the few most recently used storages, each holding its cache weakly (the runner must not keep a caller's
cache alive); a cache still bound when another takes its storage first gets tensors of its own back (two live caches
never share storage); a storage let go takes its graphs with it. What differs per kind (what is copied, how a layer is
pointed at bcg's tensors) is its ``Binder``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


@dataclass
class Storage:
    """bcg's tensors for one shape signature (a kind's subclass holds them) and the cache bound to them."""

    holder: Callable[[], Any] = field(default=lambda: None, kw_only=True)

    def held_by(self, cache: Any) -> bool:
        return self.holder() is cache


S = TypeVar("S", bound=Storage)


class Binder(Protocol[S]):
    """What one kind of binding does to a cache."""

    def copy_in(self, cache: Any, storage: S) -> None:
        """Copy what ``cache`` holds into the storage and point the cache at the storage's tensors (skipping what it
        holds already; ``storage.held_by`` still tells the previous holder)."""

    def hand_back(self, cache: Any, storage: S) -> None:
        """``cache`` is bound to the storage no more: it gets tensors of its own with what it held."""

    def dropped(self, storage: S) -> None:
        """The storage was let go: free what reads it (graphs capture its addresses)."""


class Bindings(Generic[S]):
    """The storages of one kind, least recently used first, at most ``max_storages`` of them."""

    def __init__(self, binder: Binder[S], max_storages: int) -> None:
        self.binder = binder
        self.max_storages = max_storages
        self.storages: dict[Any, S] = {}

    def latest(self) -> S | None:
        """The most recently used storage (the step after a step finds its cache bound there)."""
        return next(reversed(self.storages.values()), None)

    def bind(self, cache: Any, key: Any, make: Callable[[], S | None]) -> S | None:
        """``cache`` bound to the storage of ``key`` (made by ``make`` when there is none, after letting the least
        recently used go if full; None: ``make`` could not), now the most recently used."""
        storage = self.storages.pop(key, None)
        if storage is None:
            while len(self.storages) >= self.max_storages:
                self.drop(next(iter(self.storages)))
            storage = make()
            if storage is None:
                return None
        self.storages[key] = storage
        holder = storage.holder()
        if holder is not None and holder is not cache:
            self.binder.hand_back(holder, storage)
        self.binder.copy_in(cache, storage)
        storage.holder = weakref.ref(cache)
        return storage

    def drop(self, key: Any) -> None:
        self.binder.dropped(self.storages.pop(key))

    def clear(self) -> None:
        """Let every storage go (unwrap, or graphs dropped)."""
        for key in list(self.storages):
            self.drop(key)

    def __iter__(self) -> Iterator[S]:
        return iter(self.storages.values())

    def __len__(self) -> int:
        return len(self.storages)

"""The few bcg internals that tests must reach, in one place: the rest of the suite goes through the public surface
(``wrap_model``, ``stats()``, warnings, outputs). An internal change touches this file, not every test."""

from __future__ import annotations

import re
from typing import Any

from bcg import stand_ins as stand_ins_module


def breakable_graphs(handle) -> dict[tuple[str, int], Any]:
    """The breakable graphs by (graph key as stats() names it, bucket), in capture order."""
    return {(str(key), bucket): graph for (key, bucket), graph in handle.runner.table.graphs.items()}


def without_experts(name: str) -> str:
    """A graph's name as stats() gives it, without the MoE experts implementation ("ids[grouped_mm]/fast" ->
    "ids/fast")."""
    return re.sub(r"\[[^]]*\]", "", name)


def slots(handle, key: str) -> list:
    """The break slots of the graphs of ``key`` (as stats() names it, the experts implementation left out)."""
    return next(s for k, s in handle.runner.segments.slots.items() if without_experts(str(k)) == key)


def bridges(handle) -> dict:
    """The bridge buffers by (role, *shape, dtype)."""
    return handle.runner.segments.bridges.buffers


def sizes(handle) -> list[int]:
    return handle.runner.sizes


def stack_path(handle) -> str:
    return handle.runner.stack.path


def cache_argument(handle) -> str:
    return handle.runner.cache_argument


def full_decoder(handle):
    """The full decode graphs of StaticCache steps (decode.StaticDecoder)."""
    return handle.runner.full_graphs.decoder


def stand_in_decoder(handle):
    """The full decode graphs of the static stand-ins (static_cache=True)."""
    return handle.runner.full_graphs.stand_in_decoder


def stand_ins(handle):
    """The static stand-ins (stand_ins.StandIns): their ``bindings``."""
    return handle.runner.full_graphs.stand_ins


def stand_in_positions(length: int) -> int:
    """The positions of the stand-in a dynamic cache of ``length`` tokens decodes on."""
    return stand_ins_module.stand_in_positions(length)


def mixer_states(handle):
    """A hybrid's bound mixer states (mixer_states.MixerStates): their ``bindings``."""
    return handle.runner.mixer_states


def address_watch(handle):
    return handle.runner.watch._watch


def stack_forward(handle):
    """The stack's own forward, as bcg calls it."""
    return handle.runner.original_forward


def replace_stack_forward(handle, forward) -> None:
    """The forward bcg calls as the stack's own (its eager answer, and what its graphs capture)."""
    handle.runner.original_forward = handle.runner.segments.original_forward = forward


def in_a_break(handle, active: bool) -> None:
    """As if a break of this runner were running (a re-entrant call)."""
    handle.runner._local.active = active


def backend(handle):
    """The graph backend (backends.py) the breakable graphs capture with."""
    return handle.runner.backend

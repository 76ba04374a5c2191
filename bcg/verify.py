"""Verification: the first call of each kind is run on bcg's graphs and on the eager model, on copies, and compared.

transformers rewrites the internals bcg relies on every few weeks, and a change can make a replay wrong without any
error (5.25: a hybrid's second chat turn). Where bcg runs on a transformers it was not verified on, or when asked
(``verify=True``), the first call of each kind — its phase (prompt, decode step, continuation of a past), the path bcg
would take (breakable graph, full static graph, static stand-in, mixers inside the graph) and the cache class — runs
twice: on bcg's graphs with a copy of the caller's cache, and on the eager model with the caller's own. The caller
gets eager's answer. The outputs at real tokens and every tensor and counter the caches hold are compared; a
difference beyond rounding makes that kind run eagerly from then on, with one ``BcgFallbackWarning`` saying how large
it was.
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from . import hf
from .call import Call
from .errors import BcgFallbackWarning
from .plan import Path
from .stats import Stats

logger = logging.getLogger("bcg")

# Largest difference relative to the eager value's largest magnitude that counts as rounding. 16-bit: bcg's fast
# kernels and padded buckets round differently (a wrong position or a stale state differs by far more).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_TOLERANCE_16_BIT = 0.1


class Phase(str, enum.Enum):
    PROMPT = "prompt"
    DECODE = "decode"
    CONTINUATION = "continuation"


class Kind(NamedTuple):
    """What verification is keyed by."""

    phase: Phase
    path: Path
    cache: str  # the cache class's name ("none")

    def __str__(self) -> str:
        return f"{self.phase.value} / {self.path.value} / {self.cache}"


class Difference(NamedTuple):
    size: float  # relative to the eager value's largest magnitude (inf: a count or flag differs)
    where: str

    def __str__(self) -> str:
        return f"{self.size:.3g} at {self.where}"


# Indexed attention decoding on a stand-in selects as a StaticCache does: among exactly tied index scores it may pick
# other keys than the dynamic cache eager runs on (docs/limits.md), which verification sees as a difference.
_TIED_INDEX_SCORES = ("Indexed (sparse) attention on bcg's static stand-in selects among exactly tied index scores "
                      "as a StaticCache does, not as your dynamic cache does (docs/limits.md); wrap with "
                      "static_cache=False to keep the dynamic cache's selection.")

_REPORT = "Please report it with your transformers version (see handle.stats()['verify'])."


@dataclass
class Verifier:
    """Which kinds were checked (with their difference) and which failed. ``every_call`` (``debug="numerics"``):
    every call is compared and its difference recorded in ``stats()["numerics"]``; nothing is turned eager."""

    dtype: torch.dtype
    stats: Stats
    model_name: str
    every_call: bool = False
    checked: dict[Kind, Difference] = field(default_factory=dict)
    failed: dict[Kind, Difference] = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return _TOLERANCE.get(self.dtype, _TOLERANCE_16_BIT)

    def kind(self, call: Call, path: Path) -> Kind:
        cache = call.cache
        return Kind(phase_of(call.tokens, cache), path, type(cache).__name__ if cache is not None else "none")

    def wants(self, kind: Kind) -> bool:
        return self.every_call or kind not in self.checked

    def compare(self, call: Call, kind: Kind, on_graphs: Callable[[Call], Any | None],
                eager: Callable[..., Any]) -> Any:
        """``call`` on bcg's graphs with a copy of its cache (``on_graphs``: None when it ran eagerly after all), then
        on the eager model with its own: eager's answer, the difference recorded."""
        graph_output = on_graphs(call.with_cache(hf.copy_cache(call.cache)))
        eager_output = eager(**call.arguments)
        if graph_output is not None:
            known = _TIED_INDEX_SCORES if kind.path is Path.STAND_IN and hf.holds_indexer_keys(call.cache) else None
            self._record(kind, difference(graph_output, eager_output, call.get("attention_mask")), known)
        return eager_output

    def _record(self, kind: Kind, found: Difference, known: str | None = None) -> None:
        """``known``: a documented cause of such a difference, said in place of asking for a report."""
        if self.every_call:
            self.stats.record_numerics(found.size)
            logger.info("bcg numerics: %s, %s", kind, found)
            return
        self.checked[kind] = found
        logger.info("bcg: verified %s: %s", kind, found)
        if found.size > self.tolerance:
            self.failed[kind] = found
            warnings.warn(f"bcg: {self.model_name}'s {kind} calls differ from eager by {found} on transformers "
                          f"{hf.installed_transformers()}; they run eagerly from now on. " + (known or _REPORT),
                          BcgFallbackWarning, stacklevel=6)

    def as_dict(self) -> dict:
        return {"checked": {str(k): str(d) for k, d in self.checked.items()},
                "failed": {str(k): str(d) for k, d in self.failed.items()}}


def phase_of(tokens: torch.Tensor, cache: Any) -> Phase:
    """A prompt (no past), a decode step (one token per sequence on a past) or a continuation (several on a past)."""
    if cache is None or hf.past_length(cache) == 0:
        return Phase.PROMPT
    return Phase.DECODE if tokens.shape[1] == 1 else Phase.CONTINUATION


def difference(graph_output: Any, eager_output: Any, mask: Any) -> Difference:
    """The largest difference between two stack outputs at the call's real tokens, and between every tensor and
    count their caches hold (keys and values at real positions: pad positions hold what was never read)."""
    padding = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
    worst = _tensor_difference(graph_output[0], eager_output[0], _rows(padding, graph_output[0]), "output")
    graph_state = hf.cache_state(hf.cache_of(graph_output))
    eager_state = hf.cache_state(hf.cache_of(eager_output))
    if graph_state.keys() != eager_state.keys():
        return Difference(math.inf, f"cache entries {sorted(graph_state.keys() ^ eager_state.keys())}")
    for name, eager in eager_state.items():
        got = graph_state[name]
        if isinstance(eager, torch.Tensor) and isinstance(got, torch.Tensor):
            positions = _positions(padding, eager) if name.endswith((".keys", ".values")) else None
            found = _tensor_difference(got, eager, positions, f"cache {name}")
        else:
            found = Difference(0.0 if got == eager else math.inf, f"cache {name} ({got!r} vs {eager!r})")
        worst = max(worst, found, key=lambda d: d.size)
    return worst


def _rows(padding: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """The real tokens of a [B, S, ...] output (the last S columns of the 2D mask)."""
    if padding is None or padding.shape[0] != hidden.shape[0]:
        return None
    return padding[:, -hidden.shape[1]:].bool()


def _positions(padding: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor | None:
    """The real positions of a cache's [B, H, L, D] keys or values: the mask's last L columns (a window keeps the
    last ones), or all of its columns and the unwritten tail of a static cache longer than the mask."""
    if padding is None or states.ndim != 4 or states.shape[0] != padding.shape[0]:
        return None
    length = states.shape[2]
    if padding.shape[1] >= length:
        real = padding[:, -length:].bool()
    else:
        real = torch.cat([padding.bool(), padding.new_ones(padding.shape[0], length - padding.shape[1]).bool()], 1)
    return real


def _tensor_difference(got: torch.Tensor, expected: torch.Tensor, select: torch.Tensor | None,
                       where: str) -> Difference:
    if got.shape != expected.shape:
        return Difference(math.inf, f"{where} (shape {tuple(got.shape)} vs {tuple(expected.shape)})")
    if select is not None:
        if got.ndim == 4 and select.shape == (got.shape[0], got.shape[2]):  # keys/values: positions on dim 2
            got, expected = got.transpose(1, 2)[select], expected.transpose(1, 2)[select]
        else:
            got, expected = got[select], expected[select]
    if got.numel() == 0:
        return Difference(0.0, where)
    if not got.dtype.is_floating_point:
        return Difference(0.0 if torch.equal(got, expected) else math.inf, where)
    got, expected = got.double(), expected.double()
    scale = expected.abs().max().item()
    size = (got - expected).abs().max().item() / max(scale, 1e-6)
    return Difference(size if math.isfinite(size) else math.inf, where)

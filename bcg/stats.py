"""Counters behind ``handle.stats()``."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """What the runner did: replays, rejects by reason, captures and their cost."""

    backend: str
    replays: int = 0
    full_graph_replays: int = 0  # decode steps on a static cache replayed as one graph, no breaks
    full_graphs: int = 0  # such graphs captured (per batch size, mask layout and cache shape)
    rejects: Counter = field(default_factory=Counter)
    captured: dict[tuple[str, int], float] = field(default_factory=dict)
    capture_failures: dict[str, str] = field(default_factory=dict)
    graph_bytes: int = 0
    bridge_bytes: int = 0
    invalidations: int = 0
    numerics_checks: int = 0
    numerics_max_diff: float | None = None
    fused: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_reject(self, reason: str) -> None:
        with self._lock:
            self.rejects[reason] += 1

    def count_replay(self, full_graph: bool = False) -> None:
        with self._lock:
            self.replays += 1
            self.full_graph_replays += full_graph

    def record_numerics(self, diff: float) -> None:
        with self._lock:
            self.numerics_checks += 1
            self.numerics_max_diff = max(diff, self.numerics_max_diff or 0.0)

    def as_dict(self, ready: bool, disabled_reason: str | None) -> dict:
        sizes = sorted({n for _, n in self.captured})
        return {
            "backend": self.backend,
            "ready": ready,
            "disabled_reason": disabled_reason,
            "replays": self.replays,
            "full_graph_replays": self.full_graph_replays,
            "full_graphs": self.full_graphs,
            "rejects": dict(self.rejects),
            "captured": sizes,
            "captured_graphs": [f"{kind}:{n}" for kind, n in sorted(self.captured)],
            "capture_seconds": round(sum(self.captured.values()), 4),
            "capture_failures": dict(self.capture_failures),
            "graph_bytes": self.graph_bytes,
            "bridge_bytes": self.bridge_bytes,
            "invalidations": self.invalidations,
            "numerics": {"checks": self.numerics_checks, "max_diff": self.numerics_max_diff},
            "fused_kernels": dict(self.fused),
        }

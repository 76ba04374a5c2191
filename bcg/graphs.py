"""The breakable graphs of one stack, by graph key and bucket: captured on first use, failures remembered, freed."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Callable

import torch

from .attention import StructureError
from .backends import Backend, Graph
from .errors import BcgCaptureWarning
from .plan import GraphKey
from .stats import Stats

logger = logging.getLogger("bcg")



class GraphTable:
    """Owns the breakable graphs: ``get`` captures a missing one, a failed capture is remembered (the calls of that key
    and bucket run eagerly, with one warning for the first failure), ``free`` lets graphs go."""

    def __init__(self, backend: Backend, stats: Stats) -> None:
        self.backend = backend
        self.stats = stats
        self.graphs: dict[tuple[GraphKey, int], Graph] = {}
        self.failed: dict[tuple[GraphKey, int], str] = {}
        self._warned = False

    def get(self, key: GraphKey, bucket: int, capture: Callable[[], Graph]) -> Graph | None:
        """The graph of ``key`` and ``bucket``, made by ``capture`` now if missing; None when its capture failed.
        ``capture`` raises StructureError when the stack cannot replay at all (that error propagates)."""
        graph = self.graphs.get((key, bucket))
        if graph is None and (key, bucket) not in self.failed:
            graph = self._capture(key, bucket, capture)
        return graph

    def _capture(self, key: GraphKey, bucket: int, capture: Callable[[], Graph]) -> Graph | None:
        start = time.perf_counter()
        try:
            # Tensors made while capturing outlive the call: never inference tensors, whatever mode the caller is in.
            with torch.inference_mode(False):
                graph = capture()
        except StructureError:  # the model as a whole cannot replay: the runner's to handle
            raise
        except Exception as error:
            self._failed(key, bucket, error)
            return None
        seconds = time.perf_counter() - start
        self.graphs[(key, bucket)] = graph
        self.stats.captured[(str(key), bucket)] = seconds
        self.stats.graph_bytes = self.backend.graph_bytes()
        logger.info("bcg: captured %s bucket %d in %.3f s (graph pool %.1f MiB)", key, bucket, seconds,
                    self.stats.graph_bytes / 2**20)
        return graph

    def _failed(self, key: GraphKey, bucket: int, error: Exception) -> None:
        """Capture must never take the model down: the calls of this key and bucket run eagerly instead."""
        self.failed[(key, bucket)] = f"{type(error).__name__}: {error}"
        self.stats.capture_failures[f"{key}:{bucket}"] = self.failed[(key, bucket)]
        # The traceback as text: a handler that keeps records would otherwise pin the failed run's frames and
        # their GPU tensors, and the next bucket's capture would run out of memory as well.
        logger.warning("bcg: capture of %s bucket %d failed: %s\n%s", key, bucket, self.failed[(key, bucket)],
                       "".join(traceback.format_exception(error)).rstrip())
        if not self._warned:
            self._warned = True
            warnings.warn(f"bcg: capturing {key} bucket {bucket} failed ({self.failed[(key, bucket)]}); calls of "
                          "that size run eagerly. See handle.stats()['capture_failures'].", BcgCaptureWarning,
                          stacklevel=7)

    def free(self, where: Callable[[GraphKey], bool] = lambda key: True) -> None:
        """Free the graphs whose key ``where`` selects (default: all)."""
        for key, bucket in [k for k in self.graphs if where(k[0])]:
            self.graphs.pop((key, bucket)).free()
            self.stats.captured.pop((str(key), bucket), None)
        self.stats.graph_bytes = self.backend.graph_bytes() if self.graphs else 0

    def forget_failures(self) -> None:
        """The state a capture failed under changed: try again."""
        self.failed.clear()

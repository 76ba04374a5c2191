"""Graph backends: ``cuda`` captures real breakable CUDA graph segments, ``eager`` runs the same sequence eagerly.

Both expose ``capture(run, reset) -> graph`` where ``run()`` executes the stack once on the static
inputs and returns its final hidden state, and ``graph.replay() -> hidden``. ``reset()`` (optional) runs before each
of capture's runs, outside any graph: a run that advances state (a static cache's length counters) must find it as the
step left it, or a warm-up would write past the cache's end. The ``eager`` backend makes capture's runs as ``cuda``
does (warm-ups included) and re-runs ``run()`` on each replay, so the runner, bridges, breaks and live context are
exercised on CPU.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch

Run = Callable[[], torch.Tensor]
Reset = Callable[[], None]
# Runs before the one captured: two before a backend's first capture (lazy initialisation, Triton compiles), one before
# each later one (a new shape's kernels; a third of a full ladder's capture time went to the second). The eager backend
# makes them too: a run that advances state shows on CPU what it does to a cuda capture.
WARMUP_RUNS = 2
LATER_WARMUP_RUNS = 1


class _Warmups:
    """How many warm-up runs the next capture makes."""

    warmup_runs = WARMUP_RUNS
    later_warmup_runs = LATER_WARMUP_RUNS
    _captured = False

    def _next_warmups(self) -> int:
        runs = self.later_warmup_runs if self._captured else self.warmup_runs
        self._captured = True
        return runs


def _run_as_captured(run: Run, reset: Reset | None) -> torch.Tensor:
    if reset is not None:
        reset()
    return run()


class Graph(Protocol):
    def replay(self) -> torch.Tensor: ...

    def free(self) -> None: ...


class Backend(Protocol):
    name: str

    def wrap_break(self, fn: Callable) -> Callable: ...

    def capture(self, run: Run, reset: Reset | None = None) -> Graph: ...

    def graph_bytes(self) -> int: ...

    def replay_context(self, fast: bool): ...


class EagerGraph:
    """Replays by running the stack again: same sequencing, no graphs."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def replay(self) -> torch.Tensor:
        return self._run()

    def free(self) -> None:
        self._run = None


class EagerBackend(_Warmups):
    name = "eager"

    def wrap_break(self, fn: Callable) -> Callable:
        return fn

    def capture(self, run: Run, reset: Reset | None = None) -> Graph:
        for _ in range(self._next_warmups() + 1):  # dry runs, as cuda's capture makes (the break count is checked too)
            _run_as_captured(run, reset)
        return EagerGraph(run)

    def graph_bytes(self) -> int:
        return 0

    def replay_context(self, fast: bool):
        return nullcontext()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No Python GC during capture: a finalizer running CUDA work mid-capture would land in (or break) the graph."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _end_recording_to(device: torch.device, pool: tuple) -> None:
    """End the allocator's recording to ``pool`` where a failed capture left it on (torch ends it only after
    cudaStreamEndCapture, which raises for an invalidated capture); where torch did end it, there is nothing to end."""
    from torch.cuda.memory import _cuda_endAllocateToPool

    try:
        _cuda_endAllocateToPool(device.index if device.index is not None else torch.cuda.current_device(), pool)
    except RuntimeError:  # not recording: the capture ended as it should
        pass


class CudaGraph:
    def __init__(self, graph, output: torch.Tensor) -> None:
        self._graph = graph
        self._output = output

    def replay(self) -> torch.Tensor:
        self._graph.replay()
        return self._output

    def free(self) -> None:
        self._graph.reset()
        self._output = None


class CudaBackend(_Warmups):
    """Segments captured with ``breakable_cuda_graphs`` on a side stream, all buckets sharing one memory pool
    (a fresh one after a failed capture)."""

    name = "cuda"

    def __init__(self, device: torch.device, attention_kernels: str = "fast") -> None:
        from breakable_cuda_graphs import no_graph

        self.device = device
        self.attention_kernels = attention_kernels
        self._no_graph = no_graph
        self._stream = torch.cuda.Stream(device)
        self._pool = torch.cuda.graph_pool_handle()
        self._pools = [self._pool]

    def wrap_break(self, fn: Callable) -> Callable:
        return self._no_graph(fn)

    def capture(self, run: Run, reset: Reset | None = None) -> Graph:
        from breakable_cuda_graphs import BreakableCUDAGraph, breakable_graph

        with torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for _ in range(self._next_warmups()):
                    _run_as_captured(run, reset)
                if reset is not None:
                    reset()
            torch.cuda.current_stream().wait_stream(self._stream)
            torch.cuda.synchronize()
            graph = BreakableCUDAGraph(pool=self._pool)
            caller_stream = torch.cuda.current_stream()
            try:
                with _gc_paused(), breakable_graph(graph, stream=self._stream):
                    output = run()
            except BaseException:
                graph.reset()
                self._leave_failed_capture(caller_stream)
                raise
            torch.cuda.synchronize()
            return CudaGraph(graph, output)

    def _leave_failed_capture(self, caller_stream: torch.cuda.Stream) -> None:
        """A capture that failed mid-way (an operation no graph can hold) leaves the capture stream current and the
        pool unfit for later captures: even with its recording ended, every later capture into it fails with
        "beginAllocateToPool: already recording to mempool_id" (torch 2.11, H100). The caller gets its stream back
        and later captures a fresh pool; the graphs already captured keep theirs."""
        torch.cuda.set_stream(caller_stream)
        _end_recording_to(self.device, self._pool)
        self._pool = torch.cuda.graph_pool_handle()
        self._pools.append(self._pool)

    def graph_bytes(self) -> int:
        """Bytes the graph pools hold (their cudaMalloc'd segments)."""
        pools = {tuple(pool) for pool in self._pools}
        segments = torch.cuda.memory_snapshot()
        return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) in pools)

    def replay_context(self, fast: bool):
        """The SDPA kernels a replay's breaks may use: a fast decode step's keep off cuDNN, others as eager."""
        if not fast or self.attention_kernels == "eager":
            return nullcontext()
        # cuDNN attention plans anew for every KV length and costs 1-2 ms of host time per call on H100 (a decode
        # step's KV length changes every step): let SDPA choose among flash / memory-efficient / math only.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def make_backend(name: str, device: torch.device, attention_kernels: str = "fast") -> Backend:
    if name == "cuda":
        return CudaBackend(device, attention_kernels)
    return EagerBackend()

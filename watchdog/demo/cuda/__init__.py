"""The demo engine's CUDA backend: one GPU per rank, NCCL, captured ``torch.cuda.CUDAGraph``s.

``CudaStream`` has the emulated ``Stream``'s shape (launch / capture / replay / synchronize), so
the worker and the model run unchanged on both: here a "kernel" is a host closure that enqueues
real CUDA work on the current stream at once (or records it, while a graph is being captured),
and ``synchronize`` is ``torch.cuda.synchronize``. A hang inside a replay is therefore the real
thing: the host thread sits in ``torch.cuda.synchronize`` -> ``cuCtxSynchronize`` while the GPU
spins in an NCCL kernel or in the indexer kernel.

Nothing here imports triton or touches CUDA at import time: the module imports (and type-checks)
on CPU-only machines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

# NVLink multicast stays off everywhere (shared hosts: a program using it can take the host's GPUs
# out of service). Set in the orchestrator, the engine and every worker, before NCCL starts.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# The indexer's per-slot scratch: enough for any FULL graph the demo captures (slots = tokens / q).
MAX_SLOTS = 1024

Kernel = Callable[[], object]


def apply_safe_env(env: dict[str, str] | None = None) -> None:
    (os.environ if env is None else env).update(SAFE_ENV)


def cuda_problem(tp: int) -> str | None:
    """Why a TP=tp CUDA deployment cannot start here, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available (torch " + torch.__version__ + ")"
    n = torch.cuda.device_count()
    if n < tp:
        return f"TP={tp} needs {tp} GPUs (one per rank); {n} visible"
    if not dist.is_nccl_available():
        return "this torch build has no NCCL"
    return None


class CudaStream:
    """One rank's GPU, with the emulated Stream's interface."""

    def __init__(self, rank: int) -> None:
        torch.cuda.set_device(rank)
        self.device = f"cuda:{rank}"
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all of this rank's graphs
        self._capturing = False
        # Read by the indexer kernel: 1 = clamp the context length (the fix), 0 = the defect.
        self.clamp_flag = torch.ones(1, dtype=torch.int32, device=self.device)
        self.arrivals = torch.zeros(MAX_SLOTS, dtype=torch.int32, device=self.device)
        self.lengths = torch.zeros(MAX_SLOTS, dtype=torch.int64, device=self.device)

    @property
    def capturing(self) -> bool:
        return self._capturing

    def launch(self, kernel: Kernel) -> None:
        kernel()  # enqueues on the current stream (or into the graph being captured)

    @contextlib.contextmanager
    def capture(self) -> Iterator[Any]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: ProcessGroupNCCL's watchdog thread keeps querying events during a capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._capturing = True
            try:
                yield graph
            finally:
                self._capturing = False

    def replay(self, graph: Any) -> None:
        graph.replay()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    # ---- the model's kernels on this device ---------------------------------------------

    def all_reduce(self, t: torch.Tensor) -> Kernel:
        return partial(dist.all_reduce, t)

    def indexer(self, seq_lens: torch.Tensor) -> Kernel:
        from watchdog.demo.cuda.indexer import indexer_topk

        return partial(indexer_topk, seq_lens, self.clamp_flag, self.arrivals, self.lengths)

    def set_clamp(self, on: bool) -> None:
        """Stream-ordered: the next launched or replayed indexer reads it."""
        self.clamp_flag.fill_(1 if on else 0)

    def upload(self, values: list[int]) -> torch.Tensor:
        """A host list as a device tensor, without blocking the host on the stream."""
        host = torch.tensor(values, dtype=torch.int64).pin_memory()
        return host.to(self.device, non_blocking=True)

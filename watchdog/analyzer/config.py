"""The analyzer's settings: frame-name patterns and thresholds. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from watchdog.keys import LADDER


@dataclass(frozen=True)
class AnalyzerConfig:
    # Frame names (py-spy's qualified names; a pattern matches "X" or "Anything.X").
    ring_wait_frames: tuple[str, ...] = ("acquire_read", "dequeue")
    sync_frames: tuple[str, ...] = (
        "synchronize",
        "cuCtxSynchronize",
        "cudaDeviceSynchronize",
        "cudaStreamSynchronize",
        "cudaEventSynchronize",
    )
    collective_frames: tuple[str, ...] = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "chunked_all_reduce",
    )
    # Native frames (py-spy --native; C++ names, matched as substrings) that mean "inside a collective":
    # vLLM's CPU shared-memory all-reduce (under torch.compile its Python frame is only
    # ``OpOverload.__call__``), gloo, NCCL.
    native_collective_frames: tuple[str, ...] = (
        "shm_allreduce",
        "shm_all_gather",
        "shm_gather",
        "shm_send_tensor_list",
        "shm_recv_tensor_list",
        "shm_cc_ops::",
        "gloo::",
        "ProcessGroupGloo::",
        "ProcessGroupNCCL::",
        "ncclAllReduce",
        "ncclAllGather",
        "ncclReduceScatter",
        "ncclBroadcast",
        "ncclGroupEnd",
    )
    device_idle_frames: tuple[str, ...] = ("Stream._run",)
    host_thread_names: tuple[str, ...] = ("MainThread",)
    device_thread_names: tuple[str, ...] = ("device",)
    # A GPU at or above this utilization with no step progress counts as "device busy".
    busy_gpu_utilization_pct: float = 90.0
    ladder: tuple[str, ...] = LADDER

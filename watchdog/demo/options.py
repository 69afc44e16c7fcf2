"""``watchdog demo``'s options: the deployment, the workload and the fault, checked before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from watchdog.demo.client import Workload
from watchdog.demo.faults import FAULTS
from watchdog.errors import DemoError, UsageError


@dataclass(frozen=True)
class DemoOptions:
    tp: int = 2
    requests: int = 128
    concurrency: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    cudagraph_mode: str = "FULL_AND_PIECEWISE"
    num_speculative_tokens: int = 1
    max_num_seqs: int = 128
    fault: str = "none"
    fault_rank: int = 1
    fault_step: int | None = None
    seed: int = 0
    bursts: int = 1  # the requests go out in this many bursts ...
    idle_gap_s: float = 0.0  # ... separated by this much idle time (the server sits idle, not hung)
    workdir: str | None = None
    timeout_s: float = 300.0
    native_stacks: bool = True
    stall_floor_s: float = 1.0
    watch: bool = True  # False: run the deployment only, for an external `watchdog agent`
    fallback: bool = False  # True: the server under `watchdog run`'s supervisor + proxy, over HTTP
    max_restarts: int = 3  # the fallback's restart bound (per hour)
    device: str = "cpu"  # "cuda": real GPUs (one per rank), NCCL, CUDA graphs, NVML evidence

    def workload(self) -> Workload:
        return Workload(
            self.requests,
            self.concurrency,
            self.input_len,
            self.output_len,
            self.range_ratio,
            self.seed,
            bursts=self.bursts,
            idle_gap_s=self.idle_gap_s,
        )

    def validate(self) -> None:
        """Wrong arguments raise UsageError (exit 2); a machine that cannot run them, DemoError."""
        if self.cudagraph_mode not in ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "NONE"):
            raise UsageError(
                f"--cudagraph-mode {self.cudagraph_mode!r}: choose FULL_AND_PIECEWISE, FULL_DECODE_ONLY or NONE"
            )
        if self.fault not in FAULTS:
            raise UsageError(f"--fault {self.fault!r}: unknown; choose one of {', '.join(FAULTS)}")
        if not 1 <= self.tp <= 16:
            raise UsageError(f"--tp must be between 1 and 16, got {self.tp}")
        if self.fault != "none" and not 0 <= self.fault_rank < self.tp:
            raise UsageError(f"--fault-rank {self.fault_rank} is not a rank of a TP={self.tp} deployment")
        if self.requests < 1 or self.concurrency < 1 or self.output_len < 1 or self.input_len < 1:
            raise UsageError("--requests, --concurrency, --input-len and --output-len must be at least 1")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise UsageError(f"--range-ratio must be within [0, 1], got {self.range_ratio}")
        if self.bursts < 1:
            raise UsageError(f"--bursts must be at least 1, got {self.bursts}")
        if not 0.0 <= self.idle_gap_s < float("inf"):
            raise UsageError(f"--idle-gap must be a finite number of seconds >= 0, got {self.idle_gap_s}")
        if not 0.0 < self.stall_floor_s < float("inf"):
            raise UsageError(f"--stall-floor-s must be a positive number of seconds, got {self.stall_floor_s}")
        if self.max_restarts < 0:
            raise UsageError(f"--max-restarts must be at least 0, got {self.max_restarts}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            if self.fallback and self.watch:
                raise DemoError("--device cuda runs the core loop only: add --no-fallback")
            from watchdog.demo.cuda import cuda_problem  # imports torch: only for --device cuda

            problem = cuda_problem(self.tp)
            if problem is not None:
                raise DemoError(f"--device cuda: {problem}")

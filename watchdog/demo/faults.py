"""The demo's fault catalogue: each fault switches on a real defect in one code path.

A fault is never a "hang here" instruction. It enables a bug (a wrong padding computation, a
missing clamp, a forgotten collective, a leaked lock, a crash, a lock taken twice) that the
workload then runs into, and the hang follows from the mechanism. The settings travel to the
engine and workers through a pipe, never through files, argv or the environment, so nothing the
watchdog can read (ledgers, rings, stacks, process state) names them.
"""

from __future__ import annotations

from dataclasses import dataclass

FAULTS = (
    "none",
    "graph-key-divergence",
    "padded-slot-kernel-hang",
    "rank-skips-collective",
    "host-hang",
    "worker-killed",
    "engine-stall",
)

DESCRIPTIONS = {
    "none": "no fault",
    "graph-key-divergence": "on all-placeholder decode steps of 15-18 requests, rank R pads the drafter's "
    "PIECEWISE graph by request count instead of token count and replays a different graph",
    "padded-slot-kernel-hang": "the indexer kernel in FULL decode graphs lacks the clamp: a padded slot's "
    "seq_len 0 becomes length 2**32-1 and its lead block waits forever (vLLM #51593), on every rank",
    "rank-skips-collective": "rank R's eager path for mixed prefill+decode batches forgets its last all-reduce",
    "host-hang": "rank R's stats thread leaks a lock that the step loop then waits for forever",
    "worker-killed": "rank R is SIGKILLed in the middle of a decode step",
    "engine-stall": "the engine's scheduler takes its own lock twice when admitting a request into a busy batch",
}

# The verdict the watchdog must give for each fault class (README, "The 60-second demo"); ``watchdog
# bench detect`` and the GPU checks judge their runs by it. "none" has none: no incident is expected.
EXPECTED_VERDICTS: dict[str, str] = {
    "graph-key-divergence": "collective_mismatch",
    "padded-slot-kernel-hang": "device_hang",
    "rank-skips-collective": "collective_mismatch",
    "host-hang": "host_hang",
    "worker-killed": "worker_dead",
    "engine-stall": "engine_stall",
}


@dataclass(frozen=True)
class WorkerBugs:
    """Defects one worker process runs with. All False/None: a correct worker."""

    drafter_pads_by_requests: tuple[int, int] | None = None  # request-count window where it bites
    unclamped_indexer: bool = False
    forgets_collective_on_mixed_eager: bool = False
    stats_lock_leak: bool = False
    dies_mid_step: bool = False
    only_step: int | None = None  # --fault-step: the defect exists at this step only

    def at(self, step: int) -> bool:
        return self.only_step is None or step == self.only_step


@dataclass(frozen=True)
class EngineBugs:
    scheduler_lock_reentry: bool = False
    only_step: int | None = None

    def at(self, step: int) -> bool:
        return self.only_step is None or step == self.only_step


@dataclass(frozen=True)
class FaultPlan:
    name: str = "none"
    rank: int = 1
    step: int | None = None
    window: tuple[int, int] = (15, 18)

    def __post_init__(self) -> None:
        if self.name not in FAULTS:
            raise ValueError(f"unknown fault {self.name!r}; choose one of: {', '.join(FAULTS)}")

    def worker_bugs(self, rank: int) -> WorkerBugs:
        mine = rank == self.rank
        return WorkerBugs(
            drafter_pads_by_requests=self.window if mine and self.name == "graph-key-divergence" else None,
            unclamped_indexer=self.name == "padded-slot-kernel-hang",
            forgets_collective_on_mixed_eager=mine and self.name == "rank-skips-collective",
            stats_lock_leak=mine and self.name == "host-hang",
            dies_mid_step=mine and self.name == "worker-killed",
            only_step=self.step,
        )

    def engine_bugs(self) -> EngineBugs:
        return EngineBugs(scheduler_lock_reentry=self.name == "engine-stall", only_step=self.step)

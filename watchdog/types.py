"""The watchdog's records: evidence, snapshots, findings and the diagnosis.

Imports nothing from ``watchdog``; only the ledger records of ``collectors``. Every other
module imports this one. JSON shapes here are the stable, versioned contract.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from collectors.format import CollectiveOp, GraphKey, Ledger
from collectors.jsonrecords import JsonRecord, fields_json, json_as

DIAGNOSIS_SCHEMA = "watchdog.diagnosis/v1"
EVIDENCE_SCHEMA = "watchdog.evidence/v1"


class Verdict(enum.StrEnum):
    COLLECTIVE_MISMATCH = "collective_mismatch"
    DEVICE_HANG = "device_hang"
    HOST_HANG = "host_hang"
    WORKER_DEAD = "worker_dead"
    ENGINE_STALL = "engine_stall"
    INCONCLUSIVE = "inconclusive"
    NO_DEADLOCK = "no_deadlock"

    @property
    def is_deadlock(self) -> bool:
        return self not in (Verdict.INCONCLUSIVE, Verdict.NO_DEADLOCK)


class RankState(enum.StrEnum):
    WAITING_COLLECTIVE = "waiting_collective"
    WAITING_DEVICE = "waiting_device"
    HOST_BUSY = "host_busy"
    IDLE = "idle"
    DEAD = "dead"
    UNKNOWN = "unknown"


class ThreadActivity(enum.StrEnum):
    """What one thread's stack says it is doing (see analyzer.stacks)."""

    RING_WAIT = "ring_wait"  # idle, waiting for the next broadcast message
    DEVICE_SYNC = "device_sync"  # host blocked until the device finishes
    COLLECTIVE = "collective"  # inside a collective (host-issued, or the device's stream)
    KERNEL = "kernel"  # a device stream running a compute kernel
    QUEUE_WAIT = "queue_wait"  # a device stream with nothing to do
    HOST_CODE = "host_code"  # anything else: busy or blocked in host code
    UNKNOWN = "unknown"


# ---- evidence -------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    name: str
    filename: str
    line: int


@dataclass(frozen=True)
class ThreadStack:
    name: str
    thread_id: int
    active: bool
    frames: tuple[Frame, ...]  # innermost first, as py-spy prints them


@dataclass(frozen=True)
class StackDump(JsonRecord):
    JSON_NAME: ClassVar[str] = "stack"
    JSON_ORDER: ClassVar[tuple[str, ...]] = ("pid", "native", "threads")

    pid: int
    threads: tuple[ThreadStack, ...]
    native: bool = False


@dataclass(frozen=True)
class ProcInfo(JsonRecord):
    JSON_NAME: ClassVar[str] = "proc"

    pid: int
    alive: bool
    status: str = ""  # psutil status: running, sleeping, disk-sleep, zombie, ...
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    num_threads: int = 0
    wchan: str = ""
    # CPU seconds each thread used during the sampling window (name or tid -> seconds)
    thread_cpu_s: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuInfo(JsonRecord):
    JSON_NAME: ClassVar[str] = "gpu"

    index: int
    utilization_pct: float
    power_w: float
    sm_clock_mhz: float
    xid_events: tuple[int, ...] = ()
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RingChunk:
    written: bool
    read: tuple[bool, ...]


def _chunks_to_json(chunks: tuple[RingChunk, ...]) -> list[list[int]]:
    return [[int(c.written), *map(int, c.read)] for c in chunks]


def _chunks_from_json(raw: Any) -> tuple[RingChunk, ...]:
    """Each chunk as its flags: written, then one read flag per reader, each 0 or 1."""
    if not isinstance(raw, list):
        raise ValueError(f"ring.chunks: expected list, got {type(raw).__name__}")
    out: list[RingChunk] = []
    for i, flags in enumerate(raw):
        if not isinstance(flags, list):
            raise ValueError(f"ring.chunks[{i}]: expected list, got {type(flags).__name__}")
        if not flags or not all(f in (0, 1) and isinstance(f, int) for f in flags):
            raise ValueError(f"ring.chunks[{i}]: expected flags of 0 or 1 (written, then one per reader)")
        out.append(RingChunk(bool(flags[0]), tuple(bool(x) for x in flags[1:])))
    return tuple(out)


@dataclass(frozen=True)
class RingState(JsonRecord):
    """One vLLM ShmRingBuffer, read from outside: per chunk its written flag and read flags. In JSON
    each chunk is a list of 0/1 flags: written, then one per reader."""

    JSON_NAME: ClassVar[str] = "ring"

    name: str
    role: str  # "broadcast" or "response"
    n_readers: int
    chunks: tuple[RingChunk, ...] = field(metadata=json_as(encode=_chunks_to_json, decode=_chunks_from_json))

    def unread_by(self, reader: int) -> int:
        """Chunks written but not yet read by this reader."""
        return sum(1 for c in self.chunks if c.written and not c.read[reader])


@dataclass(frozen=True)
class RingVerdict(JsonRecord):
    """What the rings alone say about where a stalled engine <-> workers exchange stopped.

    kind, most telling first:
      ``broadcast_full``   every broadcast chunk is written and ``readers`` have read none of them:
                           the writer (the engine) finds no free block: vLLM's "No available shared
                           memory broadcast block found" on the writer side. Those readers stopped reading.
      ``reader_behind``    ``readers`` have not read the latest broadcast(s) the others read; the ring
                           still has room. Those readers are stuck before taking their request.
      ``reply_unread``     every reader took every broadcast; the response rings of ``ranks`` hold
                           replies the engine has not read (the engine is what stopped).
      ``awaiting_reply``   every reader took every broadcast and no reply is waiting: a worker read its
                           request and has not replied (the hang is inside the step; the engine waits
                           in ``acquire_read``).
      ``idle``             nothing was ever broadcast.
      ``no_broadcast``     the broadcast ring could not be read.
    """

    kind: str
    readers: tuple[int, ...]  # broadcast readers (local worker indexes) that did not read
    ranks: tuple[int, ...]  # response rings (by worker rank) holding unread replies
    summary: str


@dataclass(frozen=True)
class ProcessEvidence:
    """Everything known about one process: a TP rank (rank >= 0) or the engine (rank None)."""

    rank: int | None
    pid: int
    ledger: Ledger | None
    stack: StackDump | None = None
    native_stack: StackDump | None = None
    proc: ProcInfo | None = None


@dataclass(frozen=True)
class StallInfo:
    """Why the detector fired (None on a post-mortem or a forced diagnosis)."""

    kind: str  # "open_step", "no_dispatch", "process_exit" or "divergence" (ranks out of step: no stall yet)
    step: int | None
    age_s: float
    deadline_s: float
    # process_exit: the ranks whose process the watcher saw gone first (the others may follow as the
    # server tears itself down before the evidence is gathered); divergence: the ranks left inside a
    # step their peers finished (age_s: how long after them), empty when their steps' contents differ
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """A frozen view of one deployment at one moment: the analyzer's only input."""

    taken_mono_ns: int
    taken_wall_ns: int
    boot_id: str
    ranks: Mapping[int, ProcessEvidence]
    engine: ProcessEvidence | None
    rings: tuple[RingState, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    missing: tuple[str, ...] = ()
    stall: StallInfo | None = None
    live: bool = True  # False for a post-mortem on ledgers alone
    workers: Mapping[int, str] = field(default_factory=dict)  # pid -> vLLM worker title ("Worker_TP1")


# ---- analysis -------------------------------------------------------------------------


def _ops_as_objects(per_rank: Mapping[int, CollectiveOp | None]) -> dict[str, Any]:
    # In a diagnosis a collective is an object; in a capture manifest, a list (CollectiveOp.to_json).
    return {str(r): None if c is None else fields_json(c) for r, c in sorted(per_rank.items())}


def _key_without_lora(key: GraphKey) -> dict[str, Any]:
    return {k: v for k, v in key.to_json().items() if k not in ("has_lora", "num_active_loras")}


@dataclass(frozen=True)
class Divergence(JsonRecord):
    """The first collective at which ranks' expected sequences differ."""

    step: int
    index: int
    # None: that rank has no collective there
    per_rank: Mapping[int, CollectiveOp | None] = field(metadata=json_as(encode=_ops_as_objects))
    sources: Mapping[int, str]  # per rank: which graph key / eager call it came from


@dataclass(frozen=True)
class RankReport(JsonRecord):
    rank: int = field(metadata=json_as(omit=True))  # the key it is listed under
    state: RankState
    step: int | None  # the step this rank is in (open) or last finished
    graph_key: GraphKey | None = field(metadata=json_as(encode=_key_without_lora))
    drafter_key: GraphKey | None = field(default=None, metadata=json_as(encode=_key_without_lora))
    padded_reqs: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Recommendation(JsonRecord):
    action: str  # "restart_safer_mode", "restart", "none", "collect_more_evidence"
    cudagraph_mode: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Finding:
    """What one rule concluded. The highest-priority finding becomes the verdict."""

    rule: str
    verdict: Verdict
    step: int | None
    culprit_ranks: tuple[int, ...]
    summary: str
    evidence: tuple[str, ...] = ()
    divergence: Divergence | None = None
    novelty: tuple[str, ...] = ()


def _rules(findings: tuple[Finding, ...]) -> list[str]:
    return [f.rule for f in findings]


@dataclass(frozen=True)
class Diagnosis(JsonRecord):
    JSON_SCHEMA: ClassVar[str] = DIAGNOSIS_SCHEMA
    JSON_ORDER: ClassVar[tuple[str, ...]] = (
        "verdict", "step", "culprit_ranks", "ranks", "first_divergence", "novelty", "missing", "evidence",
        "summary", "recommendation", "rules_fired", "rings", "no_stall_yet",
    )  # fmt: skip

    verdict: Verdict
    step: int | None
    culprit_ranks: tuple[int, ...]
    ranks: Mapping[int, RankReport]
    summary: str
    recommendation: Recommendation
    first_divergence: Divergence | None = None
    novelty: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = field(default=(), metadata=json_as(key="rules_fired", encode=_rules))
    rings: RingVerdict | None = None  # what vLLM's shm rings say (None: no ring was read)
    no_stall_yet: bool = False  # caught as the ranks' steps completed out of step, before any hang

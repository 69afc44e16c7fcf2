"""The agent's Prometheus metrics.

Names follow Prometheus conventions (``watchdog_`` prefix, base units, ``_total`` counters) and
labels stay bounded: ``tp_group``, ``rank``, ``mode``, ``size_bucket`` (powers of two), ``verdict``,
``source`` and ``role`` (small fixed sets). Never a pid, a step number or a stack.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from collectors.format import Record, StepBegin, StepEnd
from watchdog.types import GpuInfo, RingState, Verdict

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EVIDENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
MAX_BUCKET = 1 << 16
MAX_INCIDENT_SERIES = 50  # watchdog_incident_info keeps the newest incidents only


def size_bucket(num_tokens: int) -> str:
    """Smallest power of two >= num_tokens, capped: a bounded label."""
    b = 1 << max(0, math.ceil(math.log2(max(1, num_tokens))))
    return str(b) if b <= MAX_BUCKET else f"gt{MAX_BUCKET}"


@dataclass
class _Open:
    mode: str
    since_ns: int


class AgentMetrics:
    def __init__(self, tp_group: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.tp_group = g = tp_group
        grp = ["tp_group"]
        self.last_step = Gauge(
            "watchdog_rank_last_step", "Sequence number of the last step a rank began.", [*grp, "rank"], registry=r
        )
        self.last_progress = Gauge(
            "watchdog_rank_last_progress_timestamp_seconds",
            "Unix time the agent last saw a new ledger record from a rank.",
            [*grp, "rank"],
            registry=r,
        )
        self.open_age = Gauge(
            "watchdog_rank_open_step_age_seconds",
            "Age of the step a rank is inside now (0: none).",
            [*grp, "rank"],
            registry=r,
        )
        self.step_duration = Histogram(
            "watchdog_step_duration_seconds",
            "Step durations seen in the ledgers, by CUDA-graph mode.",
            [*grp, "mode"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.dispatches = Counter(
            "watchdog_graph_dispatches_total",
            "Graph keys dispatched (model forward), by mode and token bucket.",
            [*grp, "mode", "size_bucket"],
            registry=r,
        )
        self.stalls = Counter("watchdog_stalls_detected_total", "Stalls the detector declared.", grp, registry=r)
        self.divergences = Counter(
            "watchdog_divergences_detected_total",
            "Ranks found out of step as their steps completed (different keys, manifests or eager collective "
            "counts, or a rank left inside a step its peers finished), before any stall.",
            grp,
            registry=r,
        )
        self.incidents = Counter(
            "watchdog_incidents_total", "Incidents diagnosed, by verdict.", [*grp, "verdict"], registry=r
        )
        self.recovered = Counter(
            "watchdog_recovered_stalls_total",
            "Stalls that were over by the time the evidence was read (slow steps, not hangs; no incident).",
            grp,
            registry=r,
        )
        self.stall_floor = Gauge(
            "watchdog_stall_floor_seconds",
            "The stall floor now: the configured one, raised by recovered stalls up to the max floor.",
            grp,
            registry=r,
        )
        self.incident_info = Gauge(
            "watchdog_incident_info",
            "One series per recent incident (its page: /incidents/<incident> on this agent); value: unix time.",
            [*grp, "incident", "verdict", "step", "culprit_ranks"],
            registry=r,
        )
        self._incident_labels: list[tuple[str, ...]] = []
        self.deadlocked = Gauge(
            "watchdog_deadlocked", "1 while the watched server is diagnosed as deadlocked.", grp, registry=r
        )
        self.evidence_seconds = Histogram(
            "watchdog_evidence_collection_seconds",
            "Stall declared to diagnosis written (gather + analyze).",
            grp,
            buckets=EVIDENCE_BUCKETS,
            registry=r,
        )
        self.bundles = Gauge(
            "watchdog_incident_bundles", "Incident bundles kept on disk (after retention).", grp, registry=r
        )
        self.bundle_bytes = Gauge(
            "watchdog_incident_bundles_bytes", "Bytes the kept incident bundles hold.", grp, registry=r
        )
        self.bundles_deleted = Counter(
            "watchdog_incident_bundles_deleted_total",
            "Incident bundles deleted by retention (count and byte bounds, oldest first).",
            grp,
            registry=r,
        )
        self.scrape_errors = Counter(
            "watchdog_scrape_errors_total",
            "Failed reads: ledger, ring or (coordinator) agent.",
            [*grp, "source"],
            registry=r,
        )
        self.ring_lag = Gauge(
            "watchdog_ring_read_lag_chunks",
            "Chunks written to a shm ring and not yet read: per broadcast reader (= rank), or of a rank's replies.",
            [*grp, "role", "rank"],
            registry=r,
        )
        self.gpu_util = Gauge(
            "watchdog_gpu_utilization_percent",
            "NVML GPU utilization; rank is the TP rank whose process runs on the GPU ('' if none).",
            [*grp, "rank", "gpu"],
            registry=r,
        )
        self.gpu_power = Gauge(
            "watchdog_gpu_power_watts", "NVML power draw, per GPU (rank as above).", [*grp, "rank", "gpu"], registry=r
        )
        self.deadlocked.labels(g).set(0)
        self.stalls.labels(g)
        self.divergences.labels(g)
        self.bundles_deleted.labels(g)
        for source in ("ledger", "ring", "agent", "gpu"):
            self.scrape_errors.labels(g, source)
        for verdict in Verdict:  # every series exists from the start: increase() sees the first incident
            self.incidents.labels(g, verdict.value)
        self._open: dict[int, _Open] = {}
        self._seen: set[int] = set()

    def observe(self, rank: int | None, records: list[Record], now_wall: float | None = None) -> None:
        if rank is None or not records:
            return
        g, label = self.tp_group, str(rank)
        self._seen.add(rank)
        self.last_progress.labels(g, label).set(time.time() if now_wall is None else now_wall)
        for rec in records:
            if isinstance(rec, StepBegin):
                mode = rec.key.mode.value
                self._open[rank] = _Open(mode, rec.mono_ns)
                self.last_step.labels(g, label).set(rec.step)
                self.dispatches.labels(g, mode, size_bucket(rec.key.num_tokens)).inc()
            elif isinstance(rec, StepEnd):
                o = self._open.pop(rank, None)
                if o is not None:
                    self.step_duration.labels(g, o.mode).observe(max(0.0, (rec.mono_ns - o.since_ns) / 1e9))

    def incident(self, ident: str, verdict: str, step: int | None, culprits: tuple[int, ...], when: float) -> None:
        """Name one incident (the dashboard's incidents table links each to its page); only the last
        MAX_INCIDENT_SERIES stay, so that a crash-looping server cannot grow the series without bound."""
        labels = (self.tp_group, ident, verdict, "" if step is None else str(step), ",".join(map(str, culprits)))
        self.incident_info.labels(*labels).set(when)
        self._incident_labels.append(labels)
        while len(self._incident_labels) > MAX_INCIDENT_SERIES:
            self.incident_info.remove(*self._incident_labels.pop(0))

    def tick(self, now_mono_ns: int) -> None:
        """Refresh the gauges that age by themselves."""
        for rank in self._seen:
            o = self._open.get(rank)
            age = 0.0 if o is None else max(0.0, (now_mono_ns - o.since_ns) / 1e9)
            self.open_age.labels(self.tp_group, str(rank)).set(age)

    def rings(self, broadcast: RingState | None, responses: dict[int, RingState]) -> None:
        """Unread chunks per reader: of the broadcast ring (reader i = local rank i) and of each rank's replies."""
        if broadcast is not None:
            for reader in range(broadcast.n_readers):
                self.ring_lag.labels(self.tp_group, "broadcast", str(reader)).set(broadcast.unread_by(reader))
        for rank, st in responses.items():
            self.ring_lag.labels(self.tp_group, "response", str(rank)).set(st.unread_by(0))

    def gpus(self, samples: tuple[GpuInfo, ...], rank_of_pid: dict[int, int]) -> None:
        """One NVML sample per GPU, labelled with the rank whose process runs on it."""
        for gpu in samples:
            ranks = sorted({rank_of_pid[p] for p in gpu.pids if p in rank_of_pid})
            rank = str(ranks[0]) if ranks else ""
            self.gpu_util.labels(self.tp_group, rank, str(gpu.index)).set(gpu.utilization_pct)
            self.gpu_power.labels(self.tp_group, rank, str(gpu.index)).set(gpu.power_w)

    def retained(self, kept: int, kept_bytes: int, deleted: int) -> None:
        self.bundles.labels(self.tp_group).set(kept)
        self.bundle_bytes.labels(self.tp_group).set(kept_bytes)
        self.bundles_deleted.labels(self.tp_group).inc(deleted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

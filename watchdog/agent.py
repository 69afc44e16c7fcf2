"""``watchdog agent`` / ``watchdog coordinator``: the watch loop as a long-running service.

The loop runs in a thread (``Agent.run``) and the HTTP API (``watchdog.api``, FastAPI, one uvicorn
worker) reads its state. The loop is a local ``Watcher`` (an agent: ledgers of this node) or a
``Coordinator`` (pulls agents over HTTP). A single-node agent diagnoses by itself (the coordinator
is embedded); an agent started with ``member`` only detects and serves its evidence, and the
coordinator diagnoses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from watchdog.bundle import bundle_time, incident_page
from watchdog.evidence import EvidenceError
from watchdog.incident import Incident
from watchdog.logs import event
from watchdog.metrics import AgentMetrics
from watchdog.page import render_index
from watchdog.retention import Retention
from watchdog.single_flight import SingleFlight
from watchdog.snapshot import collect, read_ledger_dir, snapshot_payload
from watchdog.types import StallInfo
from watchdog.watcher import Watcher

log = logging.getLogger("watchdog")

GPU_RETRY_S = 60.0  # after a failed NVML sample
STATUS_SCHEMA = "watchdog.status/v1"


class Loop(Protocol):
    progressed: bool

    def poll(self) -> StallInfo | None: ...

    def handle(self, stall: StallInfo | None) -> Incident: ...

    def close(self) -> None: ...


@dataclass
class Agent:
    loop: Loop
    metrics: AgentMetrics
    role: str = "agent"  # "agent" (diagnoses itself), "member" (a coordinator diagnoses) or "coordinator"
    token: str = ""
    poll_s: float = 0.1
    ring_every_s: float = 1.0
    gpu_every_s: float = 5.0
    extra: Callable[[], dict[str, Any]] | None = None  # more /v1/status fields (the supervisor's ladder)
    on_incident: Callable[[Incident], None] | None = None  # after the bundle is written (Kubernetes actions)
    on_declared: Callable[[StallInfo], None] | None = None  # a stall or divergence, before its evidence is gathered
    retention: Retention | None = None  # bounds on the incident bundles kept on disk
    diagnose_now_interval_s: float = 10.0  # POST /v1/diagnose-now at most this often
    public: bool = False  # the API listens beyond loopback: no evidence without a token
    incidents: list[Incident] = field(default_factory=list)
    recovered: int = 0  # stalls over before the evidence was read (no incident)
    deadlocked: bool = False
    open_stall: StallInfo | None = None
    progress: int = 0  # polls that saw new records: a coordinator compares it between polls
    started_wall: float = field(default_factory=time.time)
    _next_rings_ns: int = 0
    _next_gpus_ns: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _diagnosing: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    # The first bundle written since the server last made progress: the evidence of what is wrong
    # now, kept by retention until steps move again (later forced re-diagnoses are not protected,
    # or a hung server plus diagnose-now would fill the disk after all).
    _unresolved: str | None = None
    _last_forced: float = -math.inf
    flight: SingleFlight = field(default_factory=SingleFlight)

    def step(self) -> Incident | None:
        """One poll; on a stall, gather, diagnose and record the incident (a member only records the stall)."""
        stall = self.loop.poll()
        now = time.monotonic_ns()
        self.metrics.tick(now)
        if self.loop.progressed:
            with self._lock:
                self.deadlocked, self.open_stall = False, None
                self.progress += 1
                self._unresolved = None
            self.metrics.deadlocked.labels(self.metrics.tp_group).set(0)
        if isinstance(self.loop, Watcher):
            self.metrics.stall_floor.labels(self.metrics.tp_group).set(self.loop.stall_floor_s())
        if isinstance(self.loop, Watcher) and now >= self._next_rings_ns:
            self._next_rings_ns = now + int(self.ring_every_s * 1e9)
            broadcast, responses = self.loop.rings()
            self.metrics.rings(broadcast, responses)
        if isinstance(self.loop, Watcher) and self.loop.sources.gpus is not None and now >= self._next_gpus_ns:
            self._next_gpus_ns = now + int(self.gpu_every_s * 1e9)
            self._sample_gpus(self.loop)
        if stall is None:
            return None
        if stall.kind == "divergence":
            self.metrics.divergences.labels(self.metrics.tp_group).inc()
        else:
            self.metrics.stalls.labels(self.metrics.tp_group).inc()
        event(
            "stall",
            f"stall declared ({stall.kind}): step {stall.step} open {stall.age_s:.2f} s > deadline "
            f"{stall.deadline_s:.2f} s",
            logging.WARNING,
            kind=stall.kind,
            step=stall.step,
            age_s=round(stall.age_s, 3),
            deadline_s=round(stall.deadline_s, 3),
        )
        if self.role == "member":
            with self._lock:
                self.open_stall = stall
            return None
        if self.on_declared is not None:
            self.on_declared(stall)
        return self.diagnose(stall)

    def _sample_gpus(self, watcher: Watcher) -> None:
        assert watcher.sources.gpus is not None
        try:
            samples = watcher.sources.gpus.sample()
        except EvidenceError as exc:
            # No NVML on this node (or it broke): count it, and ask again only once a minute.
            log.debug("gpu sample failed: %s", exc)
            self.metrics.scrape_errors.labels(self.metrics.tp_group, "gpu").inc()
            self._next_gpus_ns = time.monotonic_ns() + int(GPU_RETRY_S * 1e9)
            return
        self.metrics.gpus(samples, watcher.rank_pids())

    def diagnose(self, stall: StallInfo | None) -> Incident:
        with self._diagnosing:
            incident = self.loop.handle(stall)
        g = self.metrics.tp_group
        verdict = incident.diagnosis.verdict
        if incident.recovered:
            return self._recovered(incident)
        self.metrics.incidents.labels(g, verdict.value).inc()
        self.metrics.evidence_seconds.labels(g).observe((incident.diagnosed_mono_ns - incident.detected_mono_ns) / 1e9)
        d = incident.diagnosis
        self.metrics.incident(incident.bundle.name, verdict.value, d.step, d.culprit_ranks, time.time())
        with self._lock:
            self.incidents.append(incident)
            self.deadlocked = verdict.is_deadlock
            self._unresolved = self._unresolved or incident.bundle.name
            keep = {self._unresolved}
        if self.retention is not None:
            self.retention.sweep(keep)
        self.metrics.deadlocked.labels(g).set(1 if verdict.is_deadlock else 0)
        d = incident.diagnosis
        culprits = ",".join(map(str, d.culprit_ranks)) or "none"
        event(
            "incident",
            f"incident written: {verdict.value} (culprit ranks {culprits}) in "
            f"{(incident.diagnosed_mono_ns - incident.detected_mono_ns) / 1e9:.2f} s: {incident.bundle}",
            logging.WARNING if verdict.is_deadlock else logging.INFO,
            verdict=verdict.value,
            culprit_ranks=list(d.culprit_ranks),
            step=d.step,
            bundle=str(incident.bundle),
            timings={k: round(v, 3) for k, v in incident.timings.items()},
        )
        if self.on_incident is not None:
            self.on_incident(incident)
        return incident

    def _recovered(self, incident: Incident) -> Incident:
        """A stall that was over by the time the evidence was read: a slow step, not a hang. Counted and
        logged, one line in recovered.jsonl; not an incident (no bundle, no page, no Kubernetes action)."""
        stall = incident.stall
        assert stall is not None
        with self._lock:
            self.recovered += 1
        self.metrics.recovered.labels(self.metrics.tp_group).inc()
        event(
            "recovered",
            f"stall recovered ({stall.kind}, step {stall.step}): over by the time the evidence was read "
            f"(open {stall.age_s:.2f} s > deadline {stall.deadline_s:.2f} s); not an incident: {incident.bundle}",
            kind=stall.kind,
            step=stall.step,
            age_s=round(stall.age_s, 3),
            deadline_s=round(stall.deadline_s, 3),
        )
        return incident

    def run(self) -> None:
        if self.retention is not None:
            try:
                self.retention.start()
            except OSError as exc:
                log.warning("incident retention: %s", exc)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the loop must outlive any one bad poll; the next one retries
                log.exception("watch loop: poll failed")
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self.flight.close()

    def forced_retry_after(self) -> float:
        """Seconds until POST /v1/diagnose-now may run again (0: now); claims the slot when 0."""
        now = time.monotonic()
        wait = self._last_forced + self.diagnose_now_interval_s - now
        if wait > 0:
            return wait
        self._last_forced = now
        return 0.0

    def status(self, digests_since: int | None = None) -> dict[str, Any]:
        """``digests_since``: also the digests of the local ranks' steps from that step on (a coordinator
        compares ranks of several nodes with them: ``watchdog.divergence``)."""
        extra: dict[str, Any] = {}
        if digests_since is not None and isinstance(self.loop, Watcher):
            extra["digests"] = {str(r): d for r, d in self.loop.monitor.digests(digests_since).items()}
        with self._lock:
            last = self.incidents[-1].diagnosis.verdict.value if self.incidents else None
            ranks = getattr(self.loop, "ranks", None)
            return {
                "schema": STATUS_SCHEMA,
                "role": self.role,
                "tp_group": self.metrics.tp_group,
                "deadlocked": self.deadlocked,
                "last_verdict": last,
                "incidents": len(self.incidents),
                "recovered_stalls": self.recovered,
                "stall": None if self.open_stall is None else dataclasses.asdict(self.open_stall),
                "progress": self.progress,
                "ranks": None if ranks is None else sorted(ranks),
                "uptime_s": round(time.time() - self.started_wall, 3),
                **(self.extra() if self.extra is not None else {}),
                **extra,
            }

    def incident_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [summary(i) for i in self.incidents]

    def incident(self, ident: str) -> dict[str, Any] | None:
        with self._lock:
            for i in self.incidents:
                if i.bundle.name == ident:
                    return i.diagnosis.to_json()
        return None

    def page(self, ident: str) -> str | None:
        """One incident's page, drawn from its bundle now (so it shows restarts decided since)."""
        with self._lock:
            found = next((i for i in self.incidents if i.bundle.name == ident), None)
        if found is None:
            return None
        sup = (self.extra() if self.extra is not None else {}).get("supervisor") or {}
        restarts = [r for r in sup.get("restarts") or () if r.get("after_incident") == ident]
        return incident_page(found, restarts)

    def index_page(self) -> str:
        rows = [{**s, "time": bundle_time(s["id"])} for s in reversed(self.incident_list())]
        return render_index(rows)

    def snapshot(self) -> dict[str, Any] | None:
        """This node's evidence, for a coordinator; None when this loop has no local evidence."""
        if not isinstance(self.loop, Watcher):
            return None
        with self._lock:
            stall = self.open_stall
        w = self.loop
        ledgers = read_ledger_dir(w.ledger_dir, w.ranks)
        return snapshot_payload(ledgers, collect(ledgers, w.sources, stall))


def summary(i: Incident) -> dict[str, Any]:
    return {
        "id": i.bundle.name,
        "verdict": i.diagnosis.verdict.value,
        "step": i.diagnosis.step,
        "culprit_ranks": list(i.diagnosis.culprit_ranks),
        "summary": i.diagnosis.summary,
        "page": f"/incidents/{i.bundle.name}",
    }

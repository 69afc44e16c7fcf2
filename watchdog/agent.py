"""``watchdog agent``: the watcher as a long-running sidecar with an HTTP API and /metrics.

First slice of the daemon: one agent watching one ledger directory (single-node TP). The
watch loop runs in a thread; the API (FastAPI, served by one uvicorn worker) only reads the
agent's state.

    GET /healthz                the agent itself is alive
    GET /livez                  503 while the watched server is diagnosed as deadlocked
    GET /v1/status              verdict state, ranks seen, incidents so far
    GET /v1/incidents           incident summaries, newest last
    GET /v1/incidents/{id}      one incident's Diagnosis JSON
    GET /metrics                Prometheus text format
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from watchdog.evidence.gpus import Nvml
from watchdog.snapshot import Sources
from watchdog.watcher import Incident, Watcher


@dataclass
class Agent:
    watcher: Watcher
    poll_s: float = 0.1
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    incidents: list[Incident] = field(default_factory=list)
    deadlocked: bool = False
    started_wall: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        r = self.registry
        self.m_stalls = Counter("watchdog_stalls_detected_total", "Stalls the detector declared.", registry=r)
        self.m_incidents = Counter(
            "watchdog_incidents_total", "Incidents diagnosed, by verdict.", ["verdict"], registry=r
        )
        self.m_deadlocked = Gauge(
            "watchdog_deadlocked", "1 while the watched server is diagnosed as deadlocked.", registry=r
        )
        self.m_collect = Gauge(
            "watchdog_last_diagnosis_duration_seconds", "Stall declared to diagnosis written.", registry=r
        )

    def step(self) -> Incident | None:
        """One poll of the ledgers; on a stall, gather, diagnose and record the incident."""
        stall = self.watcher.poll()
        if self.watcher.progressed:
            with self._lock:
                self.deadlocked = False
            self.m_deadlocked.set(0)
        if stall is None:
            return None
        self.m_stalls.inc()
        incident = self.watcher.handle(stall)
        verdict = incident.diagnosis.verdict
        self.m_incidents.labels(verdict=verdict.value).inc()
        self.m_collect.set((incident.diagnosed_mono_ns - incident.detected_mono_ns) / 1e9)
        with self._lock:
            self.incidents.append(incident)
            self.deadlocked = verdict.is_deadlock
        self.m_deadlocked.set(1 if verdict.is_deadlock else 0)
        return incident

    def run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            last = self.incidents[-1].diagnosis.verdict.value if self.incidents else None
            return {
                "schema": "watchdog.status/v1",
                "deadlocked": self.deadlocked,
                "last_verdict": last,
                "incidents": len(self.incidents),
                "ledger_dir": str(self.watcher.ledger_dir),
                "uptime_s": round(time.time() - self.started_wall, 3),
            }

    def incident_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "id": i.bundle.name,
                    "verdict": i.diagnosis.verdict.value,
                    "step": i.diagnosis.step,
                    "culprit_ranks": list(i.diagnosis.culprit_ranks),
                    "summary": i.diagnosis.summary,
                }
                for i in self.incidents
            ]

    def incident(self, ident: str) -> dict[str, Any] | None:
        with self._lock:
            for i in self.incidents:
                if i.bundle.name == ident:
                    return i.diagnosis.to_json()
        return None

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


def make_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="tp-deadlock-watchdog agent", version="1")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/livez")
    def livez(response: Response) -> dict[str, Any]:
        st = agent.status()
        if st["deadlocked"]:
            response.status_code = 503
        return {"deadlocked": st["deadlocked"], "last_verdict": st["last_verdict"]}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return agent.status()

    @app.get("/v1/incidents")
    def incidents() -> list[dict[str, Any]]:
        return agent.incident_list()

    @app.get("/v1/incidents/{ident}")
    def incident(ident: str) -> dict[str, Any]:
        found = agent.incident(ident)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no incident {ident}")
        return found

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(agent.metrics(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(ledger_dir: Path, incidents_dir: Path, host: str, port: int) -> None:
    import uvicorn

    agent = Agent(Watcher(ledger_dir, incidents_dir, Sources(gpus=Nvml())))
    thread = threading.Thread(target=agent.run, name="watch-loop", daemon=True)
    thread.start()
    try:
        uvicorn.run(make_app(agent), host=host, port=port, workers=1, log_level="warning")
    finally:
        agent.stop()
        thread.join(timeout=5)
        agent.watcher.close()

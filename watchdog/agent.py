"""``watchdog agent`` / ``watchdog coordinator``: the watch loop as a long-running service.

One process: the loop runs in a thread, the API (FastAPI, one uvicorn worker) reads its state.
The loop is a local ``Watcher`` (an agent: ledgers of this node) or a ``Coordinator`` (pulls
agents over HTTP). A single-node agent diagnoses by itself (the coordinator is embedded); an agent
started with ``member`` only detects and serves its evidence, and the coordinator diagnoses.

    GET  /healthz               the agent itself is alive
    GET  /livez                 503 while the watched server is diagnosed as deadlocked
    GET  /v1/status             role, verdict state, open stall, progress counter, incidents so far
    GET  /v1/incidents          incident summaries, newest last (each with its page's URL)
    GET  /v1/incidents/{id}     one incident's Diagnosis JSON
    GET  /v1/snapshot           this node's evidence now: ledgers + stacks, processes, GPUs, rings (token if set)
    POST /v1/diagnose-now       gather and diagnose now, whatever the detector thinks (token required)
    GET  /incidents             the incident list as an HTML page, newest first
    GET  /incidents/{id}        one incident's page (HTML, self-contained; the bundle's incident.html, redrawn)
    GET  /metrics               Prometheus text format
    GET  /openapi.json          the API's OpenAPI schema (also committed as docs/openapi.json)
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from watchdog.bundle import bundle_time, incident_page
from watchdog.evidence import EvidenceError
from watchdog.incident import Incident
from watchdog.logs import event
from watchdog.metrics import AgentMetrics
from watchdog.page import render_index
from watchdog.retention import Retention
from watchdog.single_flight import Busy, SingleFlight
from watchdog.snapshot import LedgerSet, collect, read_ledger_dir
from watchdog.types import StallInfo
from watchdog.watcher import Watcher

log = logging.getLogger("watchdog")

SNAPSHOT_SCHEMA = "watchdog.snapshot/v1"
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


def snapshot_payload(ledgers: LedgerSet, evidence: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SNAPSHOT_SCHEMA,
        "ledgers": {name: base64.b64encode(zlib.compress(data, 1)).decode() for name, data in ledgers.raw.items()},
        "evidence": evidence,
    }


def payload_ledgers(payload: dict[str, Any]) -> dict[str, bytes]:
    """Inverse of the ledger part of ``snapshot_payload``; ValueError if damaged."""
    if payload.get("schema") != SNAPSHOT_SCHEMA:
        raise ValueError(f"not a {SNAPSHOT_SCHEMA} payload")
    try:
        return {str(n): zlib.decompress(base64.b64decode(d)) for n, d in payload["ledgers"].items()}
    except (KeyError, TypeError, AttributeError, zlib.error, ValueError) as exc:
        raise ValueError(f"damaged ledgers in snapshot: {exc}") from None


def make_app(agent: Agent) -> FastAPI:
    app = FastAPI(
        title="tp-deadlock-watchdog",
        version="1",
        description="Deadlock watchdog agent / coordinator for tensor-parallel vLLM serving.",
        # Swagger UI / ReDoc load their JavaScript from a CDN: a blank page on offline clusters.
        # The schema itself stays at /openapi.json (and docs/openapi.json) for any local viewer.
        docs_url=None,
        redoc_url=None,
    )

    def authorize(request: Request, required: bool) -> None:
        if not agent.token:
            if required:
                raise HTTPException(403, "no api_token configured: state-changing endpoints are disabled")
            return
        # RFC 7235: the scheme is case-insensitive ("bearer x" is as good as "Bearer x").
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), agent.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # Probes and cheap reads are coroutines on the event loop: they never wait behind evidence work,
    # which runs on the agent's single-flight executor (one gather at a time, shared by callers).
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/livez")
    async def livez(response: Response) -> dict[str, Any]:
        st = agent.status()
        if st["deadlocked"]:
            response.status_code = 503
        return {"deadlocked": st["deadlocked"], "last_verdict": st["last_verdict"]}

    @app.get("/v1/status")
    async def status(digests_since: int | None = None) -> dict[str, Any]:
        return agent.status(digests_since)

    @app.get("/v1/incidents")
    async def incidents() -> list[dict[str, Any]]:
        return agent.incident_list()

    @app.get("/v1/incidents/{ident}")
    async def incident(ident: str) -> dict[str, Any]:
        found = agent.incident(ident)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no incident {ident}")
        return found

    @app.get("/incidents", response_class=HTMLResponse)
    def incidents_html() -> HTMLResponse:
        return HTMLResponse(agent.index_page())

    @app.get("/incidents/{ident}", response_class=HTMLResponse)
    def incident_html(ident: str) -> HTMLResponse:
        found = agent.page(ident)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no incident {ident}")
        return HTMLResponse(found)

    def evidence_allowed(request: Request, required: bool) -> None:
        if not agent.token and agent.public:
            # Stacks, command lines and ledgers are not for anyone who can reach the pod's IP.
            raise HTTPException(403, "listening beyond loopback without api_token: no evidence is served")
        authorize(request, required)

    def busy(exc: Busy) -> HTTPException:
        return HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    def snapshot_json() -> bytes | None:
        found = agent.snapshot()
        return None if found is None else json.dumps(found).encode()  # serialized here, not on the loop

    @app.get("/v1/snapshot", response_model=dict[str, Any])
    async def snapshot(request: Request) -> Response:
        evidence_allowed(request, required=False)
        try:
            body = await agent.flight.run("snapshot", snapshot_json)
        except Busy as exc:
            raise busy(exc) from None
        if body is None:
            raise HTTPException(404, "a coordinator holds no local evidence: ask its agents")
        return Response(body, media_type="application/json")

    @app.post("/v1/diagnose-now")
    async def diagnose_now(request: Request) -> dict[str, Any]:
        evidence_allowed(request, required=True)
        if agent.role == "member":
            raise HTTPException(409, "a member agent sees part of the TP group: ask the coordinator")
        wait = agent.forced_retry_after()
        if wait > 0:
            raise busy(Busy(math.ceil(wait), f"diagnose-now runs at most once per {agent.diagnose_now_interval_s:g} s"))
        try:
            i = await agent.flight.run("diagnose-now", lambda: agent.diagnose(None), exclusive=True)
        except Busy as exc:
            raise busy(exc) from None
        return {**summary(i), "diagnosis": i.diagnosis.to_json()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(agent.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(agent: Agent, host: str, port: int) -> None:
    import uvicorn

    agent.public = not is_loopback(host)
    thread = threading.Thread(target=agent.run, name="watch-loop", daemon=True)
    thread.start()
    server = uvicorn.Server(uvicorn.Config(make_app(agent), host=host, port=port, workers=1, log_level="warning"))
    announce(server, agent, host, port)
    try:
        server.run()
    finally:
        agent.stop()
        thread.join(timeout=5)
        agent.loop.close()


def announce(server: Any, agent: Agent, host: str, port: int) -> None:
    """Log "listening on" once uvicorn has bound the socket (not before: a failed bind must not say it)."""

    def wait() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        auth = "bearer token required for evidence" if agent.token else "no token"
        event(
            "listening",
            f"{agent.role} listening on http://{host}:{port} (tp_group {agent.metrics.tp_group}, {auth})",
            role=agent.role,
            host=host,
            port=port,
        )

    threading.Thread(target=wait, name="announce", daemon=True).start()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything

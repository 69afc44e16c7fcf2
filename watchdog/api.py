"""The HTTP API of ``watchdog agent``, ``watchdog coordinator`` and ``watchdog run``: a FastAPI app over
an ``Agent`` (watchdog.agent), served by one uvicorn worker beside the watch loop.

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

import hmac
import ipaddress
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from watchdog.agent import Agent, summary
from watchdog.logs import event
from watchdog.single_flight import Busy


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


def _server(agent: Agent, host: str, port: int) -> Any:
    import uvicorn

    agent.public = not is_loopback(host)
    server = uvicorn.Server(uvicorn.Config(make_app(agent), host=host, port=port, workers=1, log_level="warning"))
    announce(server, agent, host, port)
    return server


def serve(agent: Agent, host: str, port: int) -> None:
    """The watch loop in a thread and the API in this one, until the server stops."""
    thread = threading.Thread(target=agent.run, name="watch-loop", daemon=True)
    thread.start()
    try:
        _server(agent, host, port).run()
    finally:
        agent.stop()
        thread.join(timeout=5)
        agent.loop.close()


def serve_in_background(agent: Agent, host: str, port: int) -> Callable[[], None]:
    """The API in a background thread (the caller runs the loop); returns a function that stops it."""
    server = _server(agent, host, port)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=5)

    return stop


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

"""The services say what they do: one log line per state change, human or JSON lines, with levels,
and (where on) the same state changes as Kubernetes Events. The end-to-end test reads the log of a
real `watchdog agent` process watching a real demo deployment with a fault."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, get, stop, wait_for
from watchdog import logs


def test_text_and_json_lines_and_levels() -> None:
    out = io.StringIO()
    logs.setup("text", "info", stream=out)
    try:
        logs.event("stall", "stall declared: step 7", logging.WARNING, step=7, deadline_s=1.5)
        logging.getLogger("watchdog").debug("not at info")
        line = out.getvalue()
        assert line.count("\n") == 1 and " WARNING stall: stall declared: step 7" in line
        out = io.StringIO()
        logs.setup("json", "warning", stream=out)
        logs.event("ledger", "first ledger of rank 0")  # info: below the level
        logs.event("incident", "incident written", logging.WARNING, verdict="host_hang", bundle="/x")
        (only,) = out.getvalue().splitlines()
        rec = json.loads(only)
        assert (rec["level"], rec["event"], rec["verdict"], rec["bundle"]) == ("warning", "incident", "host_hang", "/x")
        assert rec["ts"].endswith("Z") and rec["msg"] == "incident written"
    finally:
        logs.setup("text", "warning")


def test_kube_events_mirror_state_changes_without_blocking() -> None:
    posted: list[tuple[str, str, str]] = []
    errors: list[int] = []

    def post(reason: str, message: str, kind: str) -> None:
        if reason == "FallbackGaveUp":
            raise OSError("api down")
        posted.append((reason, message, kind))

    handler = logs.KubeEvents(post, lambda: errors.append(1))
    log = logging.getLogger("watchdog")
    log.addHandler(handler)
    try:
        logs.event("ledger", "first ledger")  # not an Event: too chatty for the pod's events
        logs.event("stall", "stall declared: step 3", logging.WARNING)
        logs.event("give_up", "gave up", logging.WARNING)
        deadline = time.monotonic() + 5
        while (not posted or not errors) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        log.removeHandler(handler)
    assert posted == [("StallDeclared", "stall declared: step 3", "Warning")]
    assert errors == [1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_agent_process_logs_each_state_change(tmp_path: Path) -> None:
    work = tmp_path / "w"
    ledgers = work / "ledgers"  # not there yet: the agent makes it
    port = free_port()
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "watchdog.cli", "agent", "--ledger-dir", str(ledgers), "--incidents-dir",
             str(tmp_path / "inc"), "--port", str(port), "--log-format", "json", "--api-token", "t0k"],
            stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
        )  # fmt: skip
    demo = None
    try:
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, 30)
        assert ledgers.is_dir()
        assert get(port, "/docs")[0] == 404  # no CDN-hosted UI; the schema stays at /openapi.json
        with (tmp_path / "demo.log").open("wb") as demo_log:
            demo = subprocess.Popen(
                [sys.executable, "-m", "watchdog.cli", "demo", "--no-watch", "--tp", "2", "--fault", "host-hang",
                 "--fault-rank", "0", "--workdir", str(work), "--timeout", "150"],
                stdout=subprocess.DEVNULL, stderr=demo_log, start_new_session=True,
            )  # fmt: skip

        def events() -> list[dict[str, Any]]:
            return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

        def incident() -> dict[str, Any] | None:
            return next((e for e in events() if e.get("event") == "incident"), None)

        written = wait_for(incident, 180)
        # --no-watch is silent by design (the agent watches): a progress line every 10 s says it is alive.
        assert wait_for(lambda: re.search(r"(starting|serving): .*\(\d+ s\)", (tmp_path / "demo.log").read_text()), 30)
        # RFC 7235: "bearer" in any case is the Bearer scheme.
        assert get_with(port, "/v1/snapshot", "bearer t0k")[0] == 200
        assert get_with(port, "/v1/snapshot", "BEARER t0k")[0] == 200
        assert get_with(port, "/v1/snapshot", "Basic t0k")[0] == 401
    finally:
        if demo is not None:
            stop(demo)
        stop(agent)
    seen = events()
    by = {e["event"]: e for e in reversed(seen)}  # the first of each kind
    assert by["listening"]["port"] == port and f"127.0.0.1:{port}" in by["listening"]["msg"]
    assert str(ledgers) in by["watching"]["msg"]
    firsts = sorted(e["path"].rsplit("/", 1)[1] for e in seen if e["event"] == "ledger")
    assert firsts == ["engine.ledger", "rank000.ledger", "rank001.ledger"]
    assert by["rings"]["rings"] >= 1 and "broadcast" in by["rings"]["msg"]
    stall = by["stall"]
    assert stall["level"] == "warning" and stall["age_s"] > stall["deadline_s"] > 0
    assert by["evidence"]["seconds"] > 0
    assert written["verdict"] == "host_hang" and written["culprit_ranks"] == [0]
    assert Path(written["bundle"]).is_dir() and written["bundle"] in written["msg"]
    assert set(written["timings"]) == {"gather", "analyze", "write"}
    order = [e["event"] for e in seen]
    assert order.index("listening") < order.index("stall") < order.index("evidence") < order.index("incident")
    assert all(e["ts"].endswith("Z") for e in seen)
    assert seen[-1]["event"] == "stopped"  # SIGINT: said as a JSON line too, stderr stays all JSON


def get_with(port: int, path: str, authorization: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

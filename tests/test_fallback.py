"""The fallback supervisor end to end: `watchdog run` over the demo server, real process trees, real HTTP.

The fault reaches each server generation through a FaultBroker socket served by the test (as
`watchdog demo` does); the supervisor only sees ledgers, rings, stacks and process state.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import demo
from watchdog.demo.client import Workload
from watchdog.demo.fallback import FaultBroker, free_port
from watchdog.demo.faults import FaultPlan
from watchdog.demo.httpclient import complete, start_http_client
from watchdog.demo.tokens import continue_text, make_prompt
from watchdog.supervisor import ladder

pytestmark = pytest.mark.slow


class Run:
    """`watchdog run ... -- python -m watchdog.demo.server ...` with a fault broker; always reaped."""

    def __init__(self, tmp: Path, fault: str, *extra: str, proxy: bool = True) -> None:
        self.work = tmp / "work"
        self.work.mkdir()
        self.state = tmp / "incidents" / "ladder.json"
        self.broker = FaultBroker(tmp / "fault.sock", FaultPlan(fault, 1))
        self.upstream, self.api = free_port(), free_port()
        self.proxy = free_port() if proxy else 0
        argv = [sys.executable, "-m", "watchdog.cli", "run", "--ledger-dir", str(tmp / "ledgers")]
        argv += ["--incidents-dir", str(tmp / "incidents"), "--no-native-stacks", "--tp-group", "t"]
        argv += ["--port", str(self.api), "--upstream", f"http://127.0.0.1:{self.upstream}", "--stop-grace-s", "5"]
        argv += ["--proxy-port", str(self.proxy), *extra, "--"]
        argv += [sys.executable, "-m", "watchdog.demo.server", "--tp", "2", "--port", str(self.upstream)]
        argv += ["--workdir", str(self.work), "--fault-from", str(self.broker.path)]
        argv += ["--cudagraph-mode", "FULL_AND_PIECEWISE"]
        self.stderr = tmp / "run.stderr"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_until(self.serving, 60, "watchdog run's API")
        except BaseException:
            self.close()
            raise

    def serving(self) -> bool:
        """The API answers (the proxy is started before it)."""
        try:
            return bool(self.get("/healthz"))
        except OSError:
            return False

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.api, timeout=10)
        try:
            conn.request("GET", path)
            body = conn.getresponse().read()
        finally:
            conn.close()
        return body.decode() if path == "/metrics" else json.loads(body)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for p in leftovers(self.work):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.broker.close()


def leftovers(work: Path) -> list[psutil.Process]:
    """Every process whose command line names this test's workdir (server, engine, workers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(work) in arg for arg in p.info["cmdline"] or []):
                found.append(p)
    return found


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for r in started:
        r.close()


def drive(run: Run, requests: int, concurrency: int, timeout: float) -> Any:
    """The bench client through the proxy until every request ended (or the test's budget ran out)."""
    stop = threading.Event()
    client = start_http_client(
        Workload(requests, concurrency, 48, 48, seed=7), f"http://127.0.0.1:{run.proxy}", stop, timeout
    )
    try:
        assert client.done.wait(timeout), f"client unfinished: {client.succeeded}/{requests}"
    finally:
        stop.set()
    return client


@pytest.mark.timeout(300)
def test_run_climbs_once_and_streams_survive_the_restart(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "graph-key-divergence")
    runs.append(run)
    client = drive(run, 48, 16, 240)
    assert (client.succeeded, client.wrong_text, client.errors) == (48, 0, {}), run.stderr.read_text()[-3000:]

    state = ladder.load(run.state, ladder.Policy())
    assert state.mode(ladder.Policy()) == "FULL_DECODE_ONLY"
    assert [(e.action, e.from_mode, e.to_mode, e.verdict) for e in state.events] == [
        ("climb", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "collective_mismatch")
    ]
    sup = run.get("/v1/status")["supervisor"]
    assert sup["generation"] == 2 and len(sup["restarts"]) == 1
    assert sup["restarts"][0]["downtime_s"] > 0
    # streams were cut mid-way by the restart and resumed, not merely retried before their first token
    assert sup["proxy"]["resumed_mid_stream"] >= 1, sup["proxy"]
    metrics = run.get("/metrics")
    assert 'watchdog_supervisor_restarts_total{mode="FULL_DECODE_ONLY",tp_group="t"} 1.0' in metrics
    assert 'watchdog_supervisor_cudagraph_mode{mode="FULL_DECODE_ONLY",tp_group="t"} 1.0' in metrics
    assert 'watchdog_supervisor_gave_up{tp_group="t"} 0.0' in metrics

    # The client's reference text is the tokens rule; the restarted (fault-free at this rung)
    # server, asked directly, produces that same text for the workload's prompts.
    for rid in (0, 17, 33):
        prompt = make_prompt(30 + rid, 7 * 1_000_003 + rid)
        text, reason = complete(f"http://127.0.0.1:{run.upstream}", prompt, 12, 30)
        assert (text, reason) == ("".join(continue_text(prompt, 12)), "")

    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == 0
    wait_until(lambda: not leftovers(run.work), 15, "the server tree to be gone")


@pytest.mark.timeout(300)
def test_restart_bound_gives_up_with_exit_code_5(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "worker-killed", "--max-restarts", "1")
    runs.append(run)
    stop = threading.Event()
    start_http_client(Workload(4000, 32, 48, 48, seed=3), f"http://127.0.0.1:{run.proxy}", stop, 60)
    try:
        rc = run.wait(240)
    finally:
        stop.set()
    err = run.stderr.read_text()
    assert rc == 5, err[-3000:]
    assert "gave up" in err and "the server stays down" in err
    state = ladder.load(run.state, ladder.Policy())
    assert state.gave_up
    # a dead worker is not a graph problem: restart at the same rung, then the bound
    assert [(e.action, e.from_mode, e.to_mode, e.verdict) for e in state.events] == [
        ("restart", "FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE", "worker_dead"),
        ("give_up", "FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE", "worker_dead"),
    ]
    wait_until(lambda: not leftovers(run.work), 15, "the server tree to be gone")


@pytest.mark.timeout(240)
def test_sigkill_of_the_supervisor_mid_restart_leaves_state_and_no_orphans(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "worker-killed")
    runs.append(run)
    stop = threading.Event()
    start_http_client(Workload(4000, 32, 48, 48, seed=3), f"http://127.0.0.1:{run.proxy}", stop, 60)
    try:
        # the decision is saved before the tree is stopped: kill the supervisor right then
        wait_until(run.state.exists, 200, "the ladder state file")
        run.proc.kill()
        run.proc.wait(timeout=10)
    finally:
        stop.set()
    state = ladder.load(run.state, ladder.Policy())
    assert [e.action for e in state.events] == ["restart"]
    wait_until(lambda: not leftovers(run.work), 20, "the server tree to die with its supervisor")


@pytest.mark.timeout(400)
def test_demo_padded_slot_hang_climbs_to_none(tmp_path: Path) -> None:
    """FULL_DECODE_ONLY still pads uniform decode batches: the hang recurs once, then NONE fixes it."""
    result, cp = demo(
        tmp_path, "--fault", "padded-slot-kernel-hang", "--tp", "2", "--requests", "64", "--no-native",
        "--timeout", "360", fallback=True, timeout=380,
    )  # fmt: skip
    assert [(r["from"], r["to"]) for r in result["restarts"]] == [
        ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"),
        ("FULL_DECODE_ONLY", "NONE"),
    ], cp.stderr[-3000:]
    assert [i["diagnosis"]["verdict"] for i in result["incidents"]] == ["device_hang", "device_hang"]
    assert result["requests"]["succeeded"] == 64 and result["requests"]["wrong_text"] == 0
    assert result["ladder"]["mode"] == "NONE" and not result["gave_up"]
    assert cp.returncode == 3


@pytest.mark.timeout(240)
def test_observe_diagnoses_and_never_restarts(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "graph-key-divergence", "--observe")
    runs.append(run)
    stop = threading.Event()
    start_http_client(Workload(48, 16, 48, 48, seed=7), f"http://127.0.0.1:{run.proxy}", stop, 200)
    try:
        wait_until(lambda: run.get("/v1/incidents"), 200, "an incident")
    finally:
        stop.set()
    [incident] = run.get("/v1/incidents")
    assert incident["verdict"] == "collective_mismatch"
    sup = run.get("/v1/status")["supervisor"]
    assert sup["observe"] and sup["generation"] == 1 and sup["restarts"] == []
    state = ladder.load(run.state, ladder.Policy())
    assert [(e.action, e.from_mode, e.to_mode) for e in state.events] == [
        ("observe", "FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE")
    ]
    conn = http.client.HTTPConnection("127.0.0.1", run.api, timeout=10)
    conn.request("GET", "/livez")
    assert conn.getresponse().status == 503  # still deadlocked: nobody restarted it
    conn.close()
    assert "watchdog_supervisor_restarts_total{" not in run.get("/metrics")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == 0
    wait_until(lambda: not leftovers(run.work), 15, "the server tree to be gone")


@pytest.mark.timeout(60)
def test_a_server_command_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    cp = run_cli(
        ["run", "--ledger-dir", str(tmp_path / "l"), "--incidents-dir", str(tmp_path / "i"), "--port",
         str(free_port()), "--", str(tmp_path / "no-such-server"), "--flag"],
        timeout=50,
    )  # fmt: skip
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert cp.stderr.strip().splitlines()[-1] == (
        f"watchdog: server command '{tmp_path / 'no-such-server'}': No such file or directory"
    )

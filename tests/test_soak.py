"""A healthy soak: a real `watchdog agent` process watches a real demo deployment for
WATCHDOG_SOAK_S seconds (default 600) of mixed long prefills, decodes and idle gaps, and must
stay quiet: no incident, no stall counted, /livez 200 throughout.

The workload: bursts of requests whose prompts range from a few tokens to three prefill chunks
of the engine's 512-token budget (--input-len 1500 --range-ratio 0.05) and outputs up to 128
tokens, separated by idle gaps of 30 s (20 s for a short soak). An idle gap leaves nothing open
and nothing pending, so no deadline applies to it; it is also far longer than any deadline the
detector derives from the step history (floor 1 s, 10 x p99), and a burst after a long gap
starts with the history intact, so the 60 s cold deadline never comes into play either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from collectors.reader import LedgerError, read_ledger
from tests.test_agent import free_port, get, wait_for
from watchdog.demo.client import ClientResult, Workload, run_client
from watchdog.snapshot import ring_specs

SOAK_S = float(os.environ.get("WATCHDOG_SOAK_S", "600"))
PER_BURST = 12  # requests per burst
BURST_EST_S = 15.0  # what the burst count is planned with (a burst takes 5-20 s; idle fills the rest)
STARTUP_EST_S = 10.0


def spawn(args: list[str], log: Path, stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """`python -m watchdog.cli ARGS` in its own process group; stderr (and stdout unless given) to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "watchdog.cli", *args],
            stdout=stdout if stdout is not None else f,
            stderr=f,
            start_new_session=True,
        )


def stop(p: subprocess.Popen[bytes], first: signal.Signals = signal.SIGINT, grace_s: float = 20) -> None:
    """``first`` (SIGINT: the demo kills its tree and unlinks its shm rings on KeyboardInterrupt)
    while it runs, then SIGKILL to whatever is left of its process group."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(grace_s)
    # The group outlives its leader while children (multiprocessing's resource tracker) finish.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of the samples of ``name`` (optionally only those whose label set contains ``labels``)."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        if labels is None or labels in (m.group(1) or ""):
            total += float(m.group(2))
            found = True
    assert found, f"no {name} sample in /metrics:\n{text}"
    return total


def leftover_rings(ledger_dir: Path) -> list[str]:
    """The deployment's shm rings (named in its engine ledger) that are still in /dev/shm."""
    try:
        specs = ring_specs(read_ledger(ledger_dir / "engine.ledger")) or []
    except (LedgerError, OSError):
        return []
    names = [str(spec["name"]) for _role, spec in specs if isinstance(spec, dict) and spec.get("name")]
    assert names, "the engine ledger names no shm rings"
    return [n for n in names if Path("/dev/shm", n).exists()]


def mapped_ledgers(pid: int) -> set[str]:
    """Ledger files the agent has mapped (LedgerTail mmaps every ledger it tails)."""
    with open(f"/proc/{pid}/maps") as f:
        return {Path(line.split()[-1]).name for line in f if line.rstrip().endswith(".ledger")}


def agent_up(agent: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    try:
        wait_for(lambda: agent.poll() is None and get(port, "/healthz")[0] == 200, timeout)
    except AssertionError:
        raise AssertionError(f"the agent did not come up (exit {agent.poll()}):\n{tail(log)}") from None


def last_json(path: Path) -> dict[str, Any]:
    lines = path.read_text().strip().splitlines()
    assert lines, "the demo printed nothing on stdout"
    data = json.loads(lines[-1])
    assert isinstance(data, dict)
    return data


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 300)
def test_healthy_soak_has_no_incident(tmp_path: Path) -> None:
    gap_s = 30.0 if SOAK_S >= 300 else 20.0
    bursts = max(2, math.ceil((SOAK_S - STARTUP_EST_S) / (gap_s + BURST_EST_S)))
    requests = bursts * PER_BURST
    work = tmp_path / "w"
    ledgers = work / "ledgers"
    ledgers.mkdir(parents=True)
    port = free_port()
    agent_log, demo_log, demo_out = tmp_path / "agent.log", tmp_path / "demo.log", tmp_path / "demo.out"
    agent = spawn(
        ["agent", "--ledger-dir", str(ledgers), "--incidents-dir", str(tmp_path / "inc"), "--port", str(port)],
        agent_log,
    )
    demo = None
    polls = 0
    try:
        agent_up(agent, port, agent_log)
        assert metric(get(port, "/metrics")[1], "watchdog_stalls_detected_total") == 0
        started = time.monotonic()
        with open(demo_out, "wb") as out:
            demo = spawn(
                [
                    "demo", "--no-watch", "--json", "--workdir", str(work), "--tp", "2",
                    "--requests", str(requests), "--concurrency", str(PER_BURST),
                    "--input-len", "1500", "--range-ratio", "0.05", "--output-len", "128",
                    "--bursts", str(bursts), "--idle-gap", str(gap_s), "--timeout", str(SOAK_S + 200),
                ],
                demo_log,
                stdout=out,
            )  # fmt: skip
        mapped: set[str] = set()
        # Watch until the soak time is up and the demo has finished (it runs about that long; if
        # it finishes early, the agent goes on watching the cleanly stopped deployment's ledgers).
        while demo.poll() is None or time.monotonic() - started < SOAK_S:
            assert time.monotonic() - started < SOAK_S + 240, f"the demo did not finish:\n{tail(demo_log)}"
            assert agent.poll() is None, f"the agent exited with {agent.returncode}:\n{tail(agent_log)}"
            status, body = get(port, "/livez")
            assert status == 200, f"/livez {status} {body} after {time.monotonic() - started:.0f} s"
            incidents = json.loads(get(port, "/v1/incidents")[1])
            assert incidents == [], f"incident(s) during a healthy soak: {json.dumps(incidents, indent=1)}"
            if demo.poll() is None:
                mapped |= mapped_ledgers(agent.pid)
            polls += 1
            time.sleep(3)
        soak_s = time.monotonic() - started
        assert demo.returncode == 0, f"demo exit {demo.returncode}:\n{tail(demo_log)}"
        result = last_json(demo_out)
        assert result["requests"]["total"] == requests
        assert result["requests"]["succeeded"] == requests, result["requests"]
        assert result["incidents"] == []
        assert {"engine.ledger", "rank000.ledger", "rank001.ledger"} <= mapped, f"agent tailed only {mapped}"
        assert get(port, "/livez")[0] == 200
        assert json.loads(get(port, "/v1/incidents")[1]) == []
        metrics = get(port, "/metrics")[1]
        assert metric(metrics, "watchdog_stalls_detected_total") == 0, metrics
        assert metric(metrics, "watchdog_divergences_detected_total") == 0, metrics  # ranks stayed in step
        assert json.loads(get(port, "/v1/status")[1])["incidents"] == 0
        assert agent.poll() is None, tail(agent_log)
        print(
            f"soak {soak_s:.0f} s: {bursts} bursts x {PER_BURST} requests, {gap_s:.0f} s idle gaps, "
            f"demo elapsed {result['elapsed_s']:.0f} s, {polls} /livez polls all 200, 0 incidents"
        )
    finally:
        if demo is not None:
            stop(demo)
        stop(agent)
    assert leftover_rings(ledgers) == [], "the demo left its shm rings in /dev/shm"


def test_client_sends_bursts_after_the_previous_one_drained_and_an_idle_gap() -> None:
    """The bench client alone, against a fake server thread: equal bursts, each sent only once
    every request of the one before has finished and the idle gap has passed."""
    workload = Workload(requests=10, concurrency=2, bursts=3, idle_gap_s=0.3)
    assert workload.burst_sizes() == [4, 3, 3]
    assert Workload(requests=10).burst_sizes() == [10]
    assert Workload(requests=2, bursts=5).burst_sizes() == [1, 1]
    requests: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[Any] = queue.Queue()
    log: list[tuple[str, int, float]] = []  # (event, rid, when)
    stop = threading.Event()

    def server() -> None:
        while not stop.is_set():
            try:
                rid, _prompt, _out = requests.get(timeout=0.05)
            except queue.Empty:
                continue
            log.append(("sent", rid, time.monotonic()))
            time.sleep(0.02)
            log.append(("done", rid, time.monotonic()))
            results.put((rid, True, 1))

    threading.Thread(target=server, daemon=True).start()
    result = ClientResult(total=workload.requests)
    try:
        run_client(workload, requests, results, stop, result)  # type: ignore[arg-type]
    finally:
        stop.set()
    assert result.done.is_set() and result.succeeded == 10
    sent = {rid: t for ev, rid, t in log if ev == "sent"}
    done = {rid: t for ev, rid, t in log if ev == "done"}
    assert sorted(sent) == list(range(10))
    for burst, nxt in (((0, 1, 2, 3), 4), ((4, 5, 6), 7)):
        last_done = max(done[r] for r in burst)
        assert sent[nxt] - last_done >= 0.3 - 0.01, (burst, nxt, sent[nxt] - last_done)
        assert all(sent[r] < sent[nxt] for r in burst)

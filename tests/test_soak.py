"""A healthy soak: `watchdog bench soak` (a real `watchdog agent` watching a real demo deployment
through bursts of long prefills and decodes and idle gaps) for WATCHDOG_SOAK_S seconds, default 60
here (the command's own default is the 10-minute soak); and the bench client's burst schedule.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import pytest

from tests.helpers import last_json_line, run_cli
from watchdog.demo.client import ClientResult, Workload, run_client

SOAK_S = float(os.environ.get("WATCHDOG_SOAK_S", "60"))  # `watchdog bench soak` runs the 10-minute one


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(SOAK_S + 400)
def test_healthy_soak_has_no_incident() -> None:
    """`watchdog bench soak`: a real agent watching a healthy demo deployment for SOAK_S seconds of
    bursts (long prefills, decodes) and idle gaps says nothing: no incident, no stall or divergence
    counted, /livez 200 at every poll, every ledger tailed, every request served, no ring left."""
    cp = run_cli(["bench", "soak", "--seconds", str(SOAK_S), "--json"], timeout=SOAK_S + 360)
    assert cp.returncode == 0, cp.stderr[-3000:]
    r = last_json_line(cp.stdout)
    assert r["incidents"] == [] and r["stalls_detected"] == 0 and r["divergences_detected"] == 0, r
    assert r["succeeded"] == r["requests"] >= 24 and r["bursts"] >= 2, r
    assert r["livez_polls"] >= SOAK_S / 3 - 2 and r["livez_failed"] == 0, r
    assert {"engine.ledger", "rank000.ledger", "rank001.ledger"} <= set(r["ledgers_tailed"]), r
    assert r["leftover_rings"] == [] and r["demo_exit"] == 0, r
    assert r["seconds"] >= SOAK_S
    print(
        f"soak {r['seconds']:.0f} s: {r['bursts']} bursts, {r['requests']} requests, {r['livez_polls']} polls, "
        f"agent CPU {r['agent_cpu_share']:.1%}, RSS {r['agent_rss_peak_mb']} MB"
    )


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

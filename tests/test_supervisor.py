"""The supervisor's decisions that vLLM's own failure modes must not fool, on a real server process.

The server is a real child process (a Python that sleeps, or exits with status 0 the way vLLM does
after it declared its engine dead); the watch loop is a small fake whose incidents come from the
real analyzer. A stall that no rule explains is restarted after ``unexplained_stall_s`` (vLLM would
wait 300 s); a server that exits after an incident is restarted whatever its exit status; a server
that exits with no incident ends ``watchdog run`` with its status.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from watchdog.analyzer import diagnose
from watchdog.incident import Incident
from watchdog.metrics import AgentMetrics
from watchdog.supervisor import ladder
from watchdog.supervisor.run import Supervisor, SupervisorConfig
from watchdog.types import Snapshot, StallInfo, Verdict

pytestmark = pytest.mark.timeout(60)


class StallingLoop:
    """A watch loop whose first poll reports a stall and whose diagnosis is inconclusive (no ledgers)."""

    def __init__(self, incidents: Path, stall: bool) -> None:
        self.incidents = incidents
        self.stall = stall
        self.progressed = False

    def poll(self) -> StallInfo | None:
        stall, self.stall = self.stall, False
        return StallInfo("open_step", 7, 2.0, 1.0) if stall else None

    def handle(self, stall: StallInfo | None) -> Incident:
        snap = Snapshot(time.monotonic_ns(), time.time_ns(), "boot", {}, None, stall=stall)
        d = diagnose(snap)
        bundle = self.incidents / f"incident-{time.monotonic_ns()}"
        bundle.mkdir(parents=True)
        now = time.monotonic_ns()
        return Incident(d, bundle, d.summary, stall, now, now)

    def close(self) -> None:
        pass


def supervisor(tmp: Path, server: str, stalls: list[bool], unexplained_s: float = 0.5) -> Supervisor:
    cfg = SupervisorConfig(
        argv=[sys.executable, "-c", server],
        ledger_dir=tmp / "ledgers",
        incidents_dir=tmp / "incidents",
        state_file=tmp / "ladder.json",
        policy=ladder.Policy(("NONE",), max_restarts=3, window_s=3600.0),
        grace_s=2.0,
        unexplained_stall_s=unexplained_s,
        poll_s=0.02,
    )
    loops = iter(stalls)
    return Supervisor(cfg, AgentMetrics("tp0"), lambda: StallingLoop(tmp / "incidents", next(loops, False)))


def run_until_restarted(sup: Supervisor, restarts: int = 1, timeout_s: float = 30.0) -> int:
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(sup.run()), daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(sup.restarts) < restarts and t.is_alive():
        time.sleep(0.05)
    sup.stop()
    t.join(20)
    assert not t.is_alive()
    return box[0]


def test_an_unexplained_stall_that_persists_is_restarted_at_the_same_rung(tmp_path: Path) -> None:
    # the first generation's loop is the fake made in Supervisor.__init__, the second one run() makes
    sup = supervisor(tmp_path, "import time; time.sleep(60)", [False, True, False], unexplained_s=0.5)
    started = time.monotonic()
    assert run_until_restarted(sup) == 0
    assert sup.incidents[0].diagnosis.verdict is Verdict.INCONCLUSIVE
    r = sup.restarts[0]
    assert (r.from_mode, r.to_mode, r.verdict) == ("NONE", "NONE", "inconclusive")
    assert time.monotonic() - started < 20  # seconds, not vLLM's 300 s
    state = ladder.load(tmp_path / "ladder.json", sup.cfg.policy)
    assert "no rule explained" in state.events[-1].reason


def test_a_server_that_exits_zero_after_an_incident_is_restarted(tmp_path: Path) -> None:
    # vLLM after its engine died: exits with status 0. The stall's incident was inconclusive and the
    # grace is long, so only the exit can trigger the restart.
    sup = supervisor(tmp_path, "import time; time.sleep(1.0)", [False, True, False], unexplained_s=600)
    assert run_until_restarted(sup) == 0
    assert sup.generation >= 2 and len(sup.restarts) == 1
    assert "exited (0) after incident" in ladder.load(tmp_path / "ladder.json", sup.cfg.policy).events[-1].reason


def test_a_server_that_exits_with_no_incident_ends_the_run_with_its_status(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "import sys, time; time.sleep(0.3); sys.exit(7)", [False, False])
    assert sup.run() == 7
    assert sup.restarts == [] and sup.generation == 1

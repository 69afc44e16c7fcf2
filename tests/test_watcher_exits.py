"""A rank's process that dies while its deployment works is an incident at once, not at a deadline.

Real worker processes write real ledgers (a step left open) and are SIGKILLed; the watcher, polling
as the agent does, reports the first to die as a ``process_exit`` and takes the ones that die after
it (a server tearing itself down, as vLLM does within about a second) as part of the same incident.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from watchdog.detector import DetectorConfig
from watchdog.snapshot import Sources
from watchdog.watcher import Watcher

pytestmark = pytest.mark.timeout(60)

WRITER = """
import sys, time
from collectors.format import CUDAGraphMode, GraphKey, ProcessKind
from collectors.recorder import Recorder
rank, world = int(sys.argv[1]), int(sys.argv[2])
rec = Recorder(sys.argv[3], kind=ProcessKind.WORKER, rank=rank, world_size=world, n_slots=256)
key = GraphKey(CUDAGraphMode.NONE, 8)
for step in range(3):
    rec.step_begin(step, key, unpadded_tokens=8, unpadded_reqs=1, launch_manifest=0)
    rec.step_end(step, True)
rec.step_begin(3, key, unpadded_tokens=8, unpadded_reqs=1, launch_manifest=0)  # dies inside step 3
print("ready", flush=True)
time.sleep(60)
"""


def start_rank(rank: int, world: int, ledgers: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(rank), str(world), str(ledgers)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def stop(ranks: list[subprocess.Popen[str]]) -> None:
    for p in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert p.stdout is not None
        p.stdout.close()


def watcher(tmp: Path) -> Watcher:
    """Stall deadlines far away (a loaded machine starts processes slowly): only exits can fire."""
    cfg = DetectorConfig(floor_s=120.0, cold_deadline_s=120.0)
    return Watcher(tmp / "ledgers", tmp / "incidents", Sources(stacks=None, procs=None), detector_cfg=cfg)


def test_the_first_rank_to_die_is_reported_at_once_and_the_teardown_is_not_a_new_incident(tmp_path: Path) -> None:
    ledgers = tmp_path / "ledgers"
    ranks = [start_rank(r, 3, ledgers) for r in range(3)]
    w = watcher(tmp_path)
    try:
        assert w.poll() is None  # every rank alive: nothing yet (the open step is young)
        ranks[2].kill()
        ranks[2].wait()
        started = time.monotonic()
        stall = w.poll()
        assert stall is not None and stall.kind == "process_exit"
        assert stall.ranks == (2,) and stall.step == 3
        assert time.monotonic() - started < 1.0  # one poll, not a stall deadline
        ranks[0].kill()  # the server tearing itself down after the first death
        ranks[0].wait()
        assert w.poll() is None
    finally:
        w.close()
        stop(ranks)


def test_a_rank_that_dies_inside_a_step_is_reported_alone(tmp_path: Path) -> None:
    ledgers = tmp_path / "ledgers"
    p = start_rank(0, 1, ledgers)
    w = watcher(tmp_path)
    try:
        w.poll()
    finally:
        p.kill()
        p.wait()
        assert p.stdout is not None
        p.stdout.close()
    # the ledger's open step makes the deployment busy: the exit is reported
    assert (s := w.poll()) is not None and s.kind == "process_exit" and s.ranks == (0,)
    w.close()


def test_a_rank_dead_before_the_first_look_is_reported_when_its_peers_are_visible(tmp_path: Path) -> None:
    ledgers = tmp_path / "ledgers"
    ranks = [start_rank(r, 2, ledgers) for r in range(2)]
    ranks[1].kill()
    ranks[1].wait()
    w = watcher(tmp_path)
    try:
        stall = w.poll()
        assert stall is not None and stall.kind == "process_exit" and stall.ranks == (1,)
    finally:
        w.close()
        stop(ranks)


def test_pids_of_another_namespace_are_never_reported(tmp_path: Path) -> None:
    """No rank's pid is visible here (the sidecar does not share the pods' pid namespace)."""
    ledgers = tmp_path / "ledgers"
    p = start_rank(0, 1, ledgers)
    p.kill()
    p.wait()
    assert p.stdout is not None
    p.stdout.close()
    w = watcher(tmp_path)
    try:
        assert w.poll() is None
    finally:
        w.close()

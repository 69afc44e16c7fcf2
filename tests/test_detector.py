"""The stall detector's adaptive deadlines, driven with real ledger records."""

from __future__ import annotations

import json
import time
from pathlib import Path

from collectors.format import (
    CUDAGraphMode,
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    ProcessKind,
    StepBegin,
    StepEnd,
)
from collectors.recorder import Recorder
from tests.factory import Deployment
from watchdog.agent import Agent
from watchdog.detector import DetectorConfig, StallDetector
from watchdog.metrics import AgentMetrics
from watchdog.snapshot import Sources
from watchdog.watcher import Watcher

MS = 1_000_000
DECODE = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
PREFILL = GraphKey(CUDAGraphMode.NONE, 4000)


def begin(step: int, t: int, key: GraphKey = DECODE) -> StepBegin:
    return StepBegin(0, step, t, key, key.num_tokens, 16, 0, 16)


def end(step: int, t: int) -> StepEnd:
    return StepEnd(0, step, t, True)


def run_steps(det: StallDetector, n: int, dur_ms: int, ranks: int = 2, key: GraphKey = DECODE) -> int:
    t = 0
    for s in range(n):
        for r in range(ranks):
            det.observe(r, [begin(s, t, key), end(s, t + dur_ms * MS)])
        t += (dur_ms + 1) * MS
    return t


def test_decode_hang_fires_at_the_floor_when_steps_are_fast() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0, multiplier=10.0))
    t = run_steps(det, 50, dur_ms=5)
    det.observe(0, [begin(50, t)])
    assert det.check(t + 900 * MS) is None
    stall = det.check(t + 1100 * MS)
    assert stall is not None and stall.kind == "open_step" and stall.step == 50
    assert stall.deadline_s == 1.0


def test_deadline_scales_with_the_kinds_p99() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0, multiplier=10.0))
    t = run_steps(det, 50, dur_ms=300)
    det.observe(0, [begin(50, t)])
    assert det.check(t + 2900 * MS) is None  # 10 x 300 ms = 3 s
    stall = det.check(t + 3100 * MS)
    assert stall is not None and abs(stall.deadline_s - 3.0) < 0.01


def test_a_first_long_prefill_is_not_a_stall() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0, multiplier=10.0, unseen_kind_factor=3.0))
    t = run_steps(det, 50, dur_ms=40)
    det.observe(0, [begin(50, t, PREFILL)])
    # unseen kind, 125x the tokens: 10 x 3 x 40 ms x 125 = 150 s
    assert det.check(t + 20_000 * MS) is None


def test_warm_up_uses_the_cold_deadline() -> None:
    det = StallDetector(DetectorConfig(cold_deadline_s=60.0))
    det.observe(0, [begin(0, 0)])
    assert det.check(30_000 * MS) is None
    assert det.check(61_000 * MS) is not None


def test_idle_server_never_fires() -> None:
    det = StallDetector()
    t = run_steps(det, 20, dur_ms=5)
    det.observe(None, [EngineResult(0, 19, t, True, 0, 0, 20)])
    assert det.check(t + 3600 * 10**9) is None


def test_requests_pending_but_nothing_dispatched_fires() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0))
    t = run_steps(det, 20, dur_ms=5)
    det.observe(
        None, [EngineStep(0, 20, t, 32, 16, 16, 16, 2, 2, 16, 0), EngineResult(1, 20, t + 6 * MS, True, 16, 2, 0)]
    )
    assert det.check(t + 500 * MS) is None
    stall = det.check(t + 1200 * MS)
    assert stall is not None and stall.kind == "no_dispatch"


def test_a_slow_step_that_completes_raises_the_floor_up_to_its_cap() -> None:
    """A step declared stalled that then ends was a hiccup, not a hang: the next one as slow is not
    declared again; a longer pause is, and the floor never rises past max_floor_s."""
    det = StallDetector(DetectorConfig(floor_s=1.0, multiplier=10.0, max_floor_s=4.0))
    t = run_steps(det, 50, dur_ms=5)
    det.observe(0, [begin(50, t)])
    assert det.check(t + 1100 * MS) is not None  # declared at the configured floor
    det.observe(0, [end(50, t + 1200 * MS)])  # ... and over after 1.2 s
    assert abs(det.floor_s() - 1.8) < 1e-9
    t += 1300 * MS
    det.observe(0, [begin(51, t)])
    assert det.check(t + 1500 * MS) is None  # the same hiccup again: not a stall now
    stall = det.check(t + 1900 * MS)
    assert stall is not None and abs(stall.deadline_s - 1.8) < 1e-9
    det.observe(0, [end(51, t + 30_000 * MS)])  # a 30 s pause that ended: capped
    assert det.floor_s() == 4.0
    t += 31_000 * MS
    det.observe(0, [begin(52, t)])
    assert det.check(t + 4100 * MS) is not None  # a real hang is still declared within the cap


def test_a_step_that_ends_before_its_deadline_teaches_nothing() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0, multiplier=10.0))
    t = run_steps(det, 50, dur_ms=5)
    det.observe(0, [begin(50, t)])
    assert det.check(t + 900 * MS) is None
    det.observe(0, [end(50, t + 950 * MS)])
    assert det.floor_s() == 1.0


def test_a_dispatch_wait_that_ends_raises_the_floor() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0))
    t = run_steps(det, 20, dur_ms=5)
    det.observe(
        None, [EngineStep(0, 20, t, 32, 16, 16, 16, 2, 2, 16, 0), EngineResult(1, 20, t + 6 * MS, True, 16, 2, 0)]
    )
    assert det.check(t + 1200 * MS) is not None
    det.observe(None, [EngineStep(2, 21, t + 1506 * MS, 32, 16, 16, 16, 2, 2, 16, 0)])
    assert abs(det.floor_s() - 1.5 * 1.5) < 1e-9


def test_arrivals_on_an_idle_engine_start_the_no_dispatch_clock() -> None:
    det = StallDetector(DetectorConfig(floor_s=1.0))
    det.observe(None, [EngineResult(0, 3, 0, True, 0, 0, 4)])
    det.observe(None, [EngineQueue(1, 10_000 * MS, 0, 5)])
    assert det.check(10_500 * MS) is None
    assert det.check(11_200 * MS) is not None


def test_a_restarted_server_clears_the_dead_ones_stall(tmp_path: Path) -> None:
    """A replaced ledger is a new process: progress (even with no records yet), old open steps forgotten."""
    dep = Deployment(tmp_path, tp=2)
    for step in range(4):
        dep.decode_step(step, reqs=16)
    dep.decode_step(4, reqs=16, open_on=[0, 1])
    watcher = Watcher(dep.dir, tmp_path / "incidents", detector_cfg=DetectorConfig(floor_s=0.01))
    later = time.monotonic_ns() + 3600 * 10**9
    assert watcher.poll(later) is not None  # the stuck step 4
    # the restarted server's processes replace the ledgers; no record written yet (no traffic)
    for rank in (-1, 0, 1):
        kind = ProcessKind.ENGINE if rank < 0 else ProcessKind.WORKER
        Recorder(dep.dir, kind=kind, rank=rank, world_size=2, n_slots=64)
    assert watcher.poll(later) is None
    assert watcher.progressed
    assert watcher.poll(later + 1) is None  # the dead processes' step 4 is not a stall of the new ones


def test_a_stall_over_by_the_evidence_is_recovered_not_an_incident(tmp_path: Path) -> None:
    """A step past its deadline that then ends (a slow step on a busy host) is a line in recovered.jsonl,
    counted, with no bundle and no incident; and the floor learns it, so the same pause is not declared
    again."""
    dep = Deployment(tmp_path, tp=2)
    for s in range(5):
        dep.decode_step(s, 16)
    w = Watcher(dep.dir, tmp_path / "inc", Sources(stacks=None, procs=None), detector_cfg=DetectorConfig(floor_s=0.2))
    a = Agent(w, AgentMetrics("t"))
    assert w.poll() is None
    dep.decode_step(5, 16, open_on=[0, 1])
    stall = None
    deadline = time.monotonic() + 10
    while stall is None and time.monotonic() < deadline:
        time.sleep(0.05)
        stall = w.poll()
    assert stall is not None and stall.kind == "open_step" and stall.step == 5
    for rec in dep.ranks:
        rec.step_end(5)
    dep.engine_result(5, running=0)
    incident = a.diagnose(stall)
    assert incident.recovered and incident.diagnosis.verdict.value == "no_deadlock"
    assert a.incidents == [] and a.status()["recovered_stalls"] == 1 and a.status()["incidents"] == 0
    assert [p.name for p in (tmp_path / "inc").iterdir()] == ["recovered.jsonl"]  # no bundle
    line = json.loads((tmp_path / "inc" / "recovered.jsonl").read_text())
    assert line["stall"]["step"] == 5 and line["verdict"] == "no_deadlock" and "slow step" in line["summary"]
    assert 'watchdog_recovered_stalls_total{tp_group="t"} 1.0' in a.metrics.exposition().decode()
    w.poll()
    assert w.stall_floor_s() >= 1.5 * stall.age_s  # learned from the step's real length

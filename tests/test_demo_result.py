"""``run_demo``'s typed result and its ``--json`` form (``watchdog.demo/v1``): the keys, their order and
which ones appear stay as the demo has always printed them, for a core-loop run and a fallback run.
The slow end-to-end runs (test_demo_faults.py, test_fallback.py) check the values in real runs."""

from __future__ import annotations

import json
from pathlib import Path

from watchdog.analyzer import diagnose
from watchdog.bundle import load_snapshot
from watchdog.demo.result import DemoResult, FallbackOutcome, Requests, demo_incident, fault_bites
from watchdog.incident import Incident
from watchdog.types import StallInfo

SCENARIO = Path(__file__).parent / "scenarios" / "host-hang"
S = 1_000_000_000


def _incident(stall: StallInfo | None = None) -> Incident:
    diagnosis = diagnose(load_snapshot(SCENARIO))
    return Incident(diagnosis, Path("/tmp/bundle-1"), "the report\n", stall, 5 * S, 6 * S + S // 2, {"gather": 0.1})


def test_core_loop_json_keys_and_order() -> None:
    inc = _incident()
    result = DemoResult(
        tp=4,
        cudagraph_mode="FULL_AND_PIECEWISE",
        fault="host-hang",
        requests=Requests(10, 7, 3),
        incidents=(demo_incident(inc, 2 * S),),
        fault_bites=fault_bites([(-1, 2 * S), (3, 2 * S + S // 4)], S),
        workdir="/w",
        elapsed_s=12.5,
    )
    out = result.to_json()
    assert list(out) == [
        "schema", "tp", "cudagraph_mode", "fault", "requests", "incidents", "fault_bites", "watched", "restarts",
        "workdir", "elapsed_s",
    ]  # fmt: skip
    assert out["schema"] == "watchdog.demo/v1"
    assert out["requests"] == {"total": 10, "succeeded": 7, "failed": 3}
    assert out["fault_bites"] == [{"rank": None, "after_s": 1.0}, {"rank": 3, "after_s": 1.25}]
    assert out["watched"] is True and out["restarts"] == []
    (i,) = out["incidents"]
    assert list(i) == ["diagnosis", "detected_after_s", "diagnosed_after_s", "bundle", "report"]
    assert i["diagnosis"] == inc.diagnosis.to_json()
    assert (i["detected_after_s"], i["diagnosed_after_s"]) == (3.0, 4.5)  # timed from the first bite
    assert i["bundle"] == "/tmp/bundle-1" and i["report"] == "the report\n"
    slim = result.to_json(reports=False)
    assert list(slim["incidents"][0]) == ["diagnosis", "detected_after_s", "diagnosed_after_s", "bundle"]
    assert json.loads(json.dumps(out)) == out
    gpu = DemoResult(**{**result.__dict__, "device": "cuda", "probes": ({"nccl_ras": "x"},)})
    assert list(gpu.to_json())[-2:] == ["device", "probes"] and gpu.to_json()["probes"] == [{"nccl_ras": "x"}]


def test_fallback_json_keys_and_order() -> None:
    result = DemoResult(
        tp=2,
        cudagraph_mode="FULL_AND_PIECEWISE",
        fault="none",
        requests=Requests(10, 10, 0, wrong_text=0, errors={}),
        incidents=(),
        fault_bites=(),
        restarts=({"from": "FULL_AND_PIECEWISE", "to": "PIECEWISE", "downtime_s": 3.5, "after_incident": "i"},),
        fallback=FallbackOutcome({"rung": 1}, gave_up=True, proxy={"forwarded": 10}, supervisor_exit=5),
        workdir="/w",
        elapsed_s=1.0,
    )
    out = result.to_json()
    assert list(out) == [
        "schema", "tp", "cudagraph_mode", "fault", "requests", "incidents", "fault_bites", "restarts", "ladder",
        "gave_up", "proxy", "supervisor_exit", "workdir", "elapsed_s",
    ]  # fmt: skip
    assert out["requests"] == {"total": 10, "succeeded": 10, "failed": 0, "wrong_text": 0, "errors": {}}
    assert (out["gave_up"], out["supervisor_exit"], out["ladder"]) == (True, 5, {"rung": 1})
    assert result.gave_up


def test_detection_without_a_bite_is_timed_from_the_stuck_step() -> None:
    inc = demo_incident(_incident(StallInfo(kind="open_step", step=7, age_s=1.5, deadline_s=1.0)), None)
    assert (inc.detected_after_s, inc.diagnosed_after_s) == (1.5, 3.0)
    assert demo_incident(_incident(None), None).detected_after_s == 0.0  # no stall on record: from detection


def test_missed_says_so_only_when_a_watched_fault_bit_without_an_incident() -> None:
    bit = fault_bites([(1, 2 * S)], S)
    base = DemoResult(
        tp=2, cudagraph_mode="NONE", fault="host-hang", requests=Requests(1, 0, 1), incidents=(), fault_bites=bit,
        workdir="/w", elapsed_s=1.0,
    )  # fmt: skip
    assert base.missed() == (
        "the host-hang fault bit (rank 1, first 1.00 s in) and no incident followed: the watchdog missed it"
    )
    assert DemoResult(**{**base.__dict__, "watched": False}).missed() is None  # an external agent watches
    assert DemoResult(**{**base.__dict__, "fault_bites": ()}).missed() is None
    assert DemoResult(**{**base.__dict__, "incidents": (demo_incident(_incident(), None),)}).missed() is None
    fallback = FallbackOutcome({}, gave_up=False, proxy={}, supervisor_exit=0)
    assert DemoResult(**{**base.__dict__, "watched": False, "fallback": fallback}).missed() is not None

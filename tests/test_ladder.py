"""The fallback ladder's decisions and its persisted state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from watchdog.errors import WatchdogError
from watchdog.supervisor.ladder import LadderState, Policy, apply, decide, load, save

SAFER = "restart_safer_mode"


def step(state: LadderState, policy: Policy, verdict: str, action: str, now: float) -> str:
    event = decide(state, policy, incident=f"inc-{now:g}", verdict=verdict, action=action, now=now)
    apply(state, policy, event)
    return f"{event.action}:{event.from_mode}->{event.to_mode}"


def test_graph_incidents_climb_others_restart_in_place() -> None:
    p, s = Policy(max_restarts=10), LadderState()
    assert step(s, p, "collective_mismatch", SAFER, 1) == "climb:FULL_AND_PIECEWISE->FULL_DECODE_ONLY"
    assert step(s, p, "worker_dead", "restart", 2) == "restart:FULL_DECODE_ONLY->FULL_DECODE_ONLY"
    assert step(s, p, "device_hang", SAFER, 3) == "climb:FULL_DECODE_ONLY->NONE"
    assert step(s, p, "device_hang", SAFER, 4) == "restart:NONE->NONE"  # nowhere safer to go
    assert s.mode(p) == "NONE" and not s.gave_up


def test_recurrence_of_the_same_kind_is_named() -> None:
    p, s = Policy(), LadderState()
    step(s, p, "device_hang", SAFER, 1)
    event = decide(s, p, incident="b", verdict="device_hang", action=SAFER, now=2)
    assert event.action == "climb" and "device_hang again under FULL_DECODE_ONLY" in event.reason


def test_bound_gives_up_and_stays_given_up() -> None:
    p, s = Policy(max_restarts=2, window_s=100), LadderState()
    step(s, p, "host_hang", "restart", 0)
    step(s, p, "host_hang", "restart", 10)
    assert step(s, p, "host_hang", "restart", 20) == "give_up:FULL_AND_PIECEWISE->FULL_AND_PIECEWISE"
    assert s.gave_up
    assert step(s, p, "host_hang", "restart", 10_000).startswith("give_up")  # until the state is removed


def test_restarts_outside_the_window_do_not_count() -> None:
    p, s = Policy(max_restarts=1, window_s=60), LadderState()
    step(s, p, "host_hang", "restart", 0)
    assert step(s, p, "host_hang", "restart", 61).startswith("restart")


def test_state_round_trips_and_resumes_at_the_same_rung(tmp_path: Path) -> None:
    p, s = Policy(), LadderState()
    step(s, p, "collective_mismatch", SAFER, 1)
    path = tmp_path / "state" / "ladder.json"
    save(path, s, p)
    again = load(path, p)
    assert again.mode(p) == "FULL_DECODE_ONLY" and again.events == s.events
    assert json.loads(path.read_text())["mode"] == "FULL_DECODE_ONLY"
    assert load(tmp_path / "none.json", p) == LadderState()
    assert not list(path.parent.glob(".ladder-*"))  # no temp files left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "unreadable"),
        ('{"schema": "x"}', "damaged"),
        ('{"schema": "watchdog.ladder/v1", "mode": "FULL", "events": [], "gave_up": false}', "lacks"),
    ],
)
def test_damaged_state_is_an_error_not_a_reset(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "ladder.json"
    path.write_text(text)
    with pytest.raises(WatchdogError, match=message):
        load(path, Policy())
    assert path.read_text() == text  # nothing recorded is lost


def test_policy_rejects_unknown_or_repeated_modes() -> None:
    with pytest.raises(WatchdogError):
        Policy(ladder=("FULL_AND_PIECEWISE", "EAGER"))
    with pytest.raises(WatchdogError):
        Policy(ladder=("NONE", "NONE"))

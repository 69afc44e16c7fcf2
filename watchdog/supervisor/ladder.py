"""The safer-config ladder: which cudagraph mode the server runs at, why, and when to stop trying.

Default ladder FULL_AND_PIECEWISE -> FULL_DECODE_ONLY -> NONE. An incident the analyzer pins on
CUDA graphs (its recommendation is ``restart_safer_mode``: a collective mismatch or device hang
in a step that replayed graphs) climbs one rung; when the same kind recurs under the new rung, it
climbs again. Any other deadlock (a dead worker, a host hang, an engine stall) restarts at the
same rung: a safer graph mode would not fix it. Bounded: at most ``max_restarts`` restarts within
``window_s``; past that the ladder gives up (and stays given up until its state file is removed).

The state lives in one JSON file written atomically (temp file, fsync, rename), so a supervisor
restart, or a pod restart with the file on a volume, resumes at the same rung.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collectors.jsonrecords import decode_record, fields_json
from watchdog.errors import WatchdogError
from watchdog.keys import LADDER, MODES

STATE_SCHEMA = "watchdog.ladder/v1"


@dataclass(frozen=True)
class Policy:
    ladder: tuple[str, ...] = LADDER
    max_restarts: int = 3
    window_s: float = 3600.0

    def __post_init__(self) -> None:
        bad = [m for m in self.ladder if m not in MODES]
        if not self.ladder or bad or len(set(self.ladder)) != len(self.ladder):
            raise WatchdogError(f"ladder {','.join(self.ladder)}: give distinct modes from {', '.join(MODES)}")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise WatchdogError("max_restarts must be >= 0 and the restart window positive")


@dataclass(frozen=True)
class Event:
    at: float  # wall-clock seconds
    incident: str
    verdict: str
    action: str  # "climb", "restart", "give_up" or "observe"
    from_mode: str
    to_mode: str
    reason: str


@dataclass
class LadderState:
    rung: int = 0
    gave_up: bool = False
    events: list[Event] = field(default_factory=list)

    def mode(self, policy: Policy) -> str:
        return policy.ladder[min(self.rung, len(policy.ladder) - 1)]

    def to_json(self, policy: Policy) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "ladder": list(policy.ladder),
            "mode": self.mode(policy),
            **fields_json(self),  # rung, gave_up, events
        }


def decide(state: LadderState, policy: Policy, *, incident: str, verdict: str, action: str, now: float) -> Event:
    """What to do about one diagnosed deadlock; ``action`` is the analyzer's recommendation action."""
    mode = state.mode(policy)
    recent = [e for e in state.events if e.action in ("climb", "restart") and now - e.at < policy.window_s]
    if state.gave_up or len(recent) >= policy.max_restarts:
        why = f"{len(recent)} restarts within {policy.window_s:g} s (max {policy.max_restarts})"
        return Event(now, incident, verdict, "give_up", mode, mode, why)
    if action == "restart_safer_mode" and state.rung + 1 < len(policy.ladder):
        prior = [e for e in state.events if e.action == "climb" and e.to_mode == mode]
        recurs = f"; {prior[-1].verdict} again under {mode}" if prior and prior[-1].verdict == verdict else ""
        nxt = policy.ladder[state.rung + 1]
        why = f"{verdict} in a step that replayed CUDA graphs{recurs}"
        return Event(now, incident, verdict, "climb", mode, nxt, why)
    why = "bottom of the ladder" if action == "restart_safer_mode" else f"{verdict} is not a CUDA-graph problem"
    return Event(now, incident, verdict, "restart", mode, mode, why)


def apply(state: LadderState, policy: Policy, event: Event) -> None:
    state.events.append(event)
    if event.action == "climb":
        state.rung = policy.ladder.index(event.to_mode)
    elif event.action == "give_up":
        state.gave_up = True


def load(path: Path, policy: Policy) -> LadderState:
    """The saved state, or a fresh one if there is no file. A damaged file is an error, never a silent reset."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return LadderState()
    except (OSError, ValueError) as exc:
        raise WatchdogError(f"ladder state {path}: unreadable ({exc}); fix or remove it") from None
    try:
        if raw["schema"] != STATE_SCHEMA:
            raise ValueError(f"schema {raw['schema']!r}")
        mode = str(raw["mode"])
        events = [decode_record(Event, e, "events") for e in raw["events"]]
        gave_up = bool(raw["gave_up"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WatchdogError(f"ladder state {path}: damaged ({exc}); fix or remove it") from None
    if mode not in policy.ladder:
        raise WatchdogError(f"ladder state {path}: at {mode}, which the ladder {','.join(policy.ladder)} lacks")
    return LadderState(policy.ladder.index(mode), gave_up, events)


def save(path: Path, state: LadderState, policy: Policy) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ladder-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_json(policy), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)

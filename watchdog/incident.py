"""One diagnosed incident: the record the watcher returns and the bundle, the agent, the supervisor
and the coordinator pass around. A record only (no I/O), so that what writes bundles
(``watchdog.bundle``) and what produces incidents (``watchdog.watcher``) both import it, one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from watchdog.types import Diagnosis, StallInfo


@dataclass(frozen=True)
class Incident:
    diagnosis: Diagnosis
    bundle: Path
    report: str
    stall: StallInfo | None
    detected_mono_ns: int
    diagnosed_mono_ns: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: gather, analyze, write
    # A stall that was over by the time the evidence was read (no_deadlock): a line in
    # recovered.jsonl (``bundle`` is that file), not an incident.
    recovered: bool = False

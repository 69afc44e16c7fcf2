"""The live loop: tail every ledger, detect a stall, gather, diagnose, write the bundle.

This is the core of the sidecar agent; ``watchdog demo`` runs it in-process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from collectors.format import ProcessKind
from collectors.reader import LedgerError, LedgerTail, ledger_paths
from watchdog.analyzer import AnalyzerConfig, diagnose
from watchdog.bundle import write_bundle
from watchdog.detector import DetectorConfig, StallDetector
from watchdog.report import render
from watchdog.snapshot import Sources, gather
from watchdog.types import Diagnosis, StallInfo

log = logging.getLogger("watchdog")


@dataclass(frozen=True)
class Incident:
    diagnosis: Diagnosis
    bundle: Path
    report: str
    stall: StallInfo
    detected_mono_ns: int
    diagnosed_mono_ns: int


@dataclass
class Watcher:
    ledger_dir: Path
    incidents_dir: Path
    sources: Sources = field(default_factory=Sources)
    detector_cfg: DetectorConfig = field(default_factory=DetectorConfig)
    analyzer_cfg: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    _tails: dict[Path, LedgerTail] = field(default_factory=dict)
    _detector: StallDetector = field(init=False)
    _fired: bool = False
    progressed: bool = False  # the last poll saw new records

    def __post_init__(self) -> None:
        self._detector = StallDetector(self.detector_cfg)

    def poll(self, now_ns: int | None = None) -> StallInfo | None:
        """Read new records and return a stall if one is open now (once per stall)."""
        for path in ledger_paths(self.ledger_dir):
            self._tails.setdefault(path, LedgerTail(path))
        progressed = False
        for path, tail in self._tails.items():
            try:
                records = tail.poll()
            except (LedgerError, OSError) as exc:
                log.debug("ledger %s unreadable: %s", path, exc)
                continue
            assert tail.header is not None
            rank = None if tail.header.kind is ProcessKind.ENGINE else tail.header.rank
            progressed = progressed or bool(records)
            self._detector.observe(rank, records)
        self.progressed = progressed
        if progressed:
            self._fired = False
        stall = self._detector.check(time.monotonic_ns() if now_ns is None else now_ns)
        if stall is None or self._fired:
            return None
        self._fired = True
        return stall

    def handle(self, stall: StallInfo) -> Incident:
        detected = time.monotonic_ns()
        snapshot, ledgers, evidence = gather(self.ledger_dir, self.sources, stall)
        diagnosis = diagnose(snapshot, self.analyzer_cfg)
        report = render(diagnosis)
        bundle = write_bundle(self.incidents_dir, ledgers, evidence, diagnosis, report)
        return Incident(diagnosis, bundle, report, stall, detected, time.monotonic_ns())

    def close(self) -> None:
        for tail in self._tails.values():
            tail.close()

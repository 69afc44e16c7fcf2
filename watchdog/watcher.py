"""The live loop: tail every ledger, detect a stall, gather, diagnose, write the bundle.

This is the core of the sidecar agent; ``watchdog demo`` runs it in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collectors.format import ProcessKind, Record
from collectors.reader import LedgerError, ledger_paths
from collectors.recorder import ledger_name
from collectors.tail import LedgerTail
from watchdog.analyzer import AnalyzerConfig, diagnose
from watchdog.bundle import page_context, record_recovered, write_bundle
from watchdog.detector import DetectorConfig, StallDetector
from watchdog.divergence import DivergenceMonitor
from watchdog.incident import Incident
from watchdog.logs import event
from watchdog.report import render
from watchdog.snapshot import LedgerSet, Sources, find_ring_specs, gather, read_ledger_dir, read_rings
from watchdog.types import RingState, Snapshot, StallInfo, Verdict

log = logging.getLogger("watchdog")


@dataclass
class Watcher:
    ledger_dir: Path
    incidents_dir: Path
    sources: Sources = field(default_factory=Sources)
    detector_cfg: DetectorConfig = field(default_factory=DetectorConfig)
    analyzer_cfg: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    ranks: frozenset[int] | None = None  # only these ranks' ledgers (multi-node); None: all in ledger_dir
    on_records: Callable[[int | None, list[Record]], None] | None = None  # e.g. the agent's metrics
    on_error: Callable[[str], None] | None = None  # a failed read: "ledger" or "ring"
    _ring_specs: tuple[int, list[tuple[str, Any]]] | None = None  # (engine ledger inode, specs)
    _ring_retry_at: float = 0.0
    _tails: dict[Path, LedgerTail] = field(default_factory=dict)
    divergence_grace_s: float = 2.0  # a rank may finish a step this long after its peers
    _detector: StallDetector = field(init=False)
    monitor: DivergenceMonitor = field(init=False)
    _fired: bool = False
    _alive: set[int] = field(default_factory=set)  # rank pids seen running (this agent can see them)
    _exited: set[int] = field(default_factory=set)  # pids already reported gone
    _announced: bool = False
    progressed: bool = False  # the last poll saw new records
    _floor_logged: float = 0.0

    def __post_init__(self) -> None:
        self._detector = StallDetector(self.detector_cfg)
        self.monitor = DivergenceMonitor(self.divergence_grace_s)

    def poll(self, now_ns: int | None = None) -> StallInfo | None:
        """Read new records and return a stall if one is open now (once per stall), or ranks out of step
        (kind "divergence", once: ``watchdog.divergence``)."""
        if not self._announced:
            self._announced = True
            which = "all ranks" if self.ranks is None else "ranks " + ",".join(map(str, sorted(self.ranks)))
            event("watching", f"watching {which} in {self.ledger_dir}", ledger_dir=str(self.ledger_dir))
        for path in ledger_paths(self.ledger_dir, self.ranks):
            self._tails.setdefault(path, LedgerTail(path))
        progressed = False
        for path, tail in self._tails.items():
            opens = tail.opens
            try:
                records = tail.poll()
            except (LedgerError, OSError) as exc:
                log.debug("ledger %s unreadable: %s", path, exc)
                self._error("ledger")
                continue
            assert tail.header is not None
            rank = None if tail.header.kind is ProcessKind.ENGINE else tail.header.rank
            if tail.opens > opens:
                who = "engine" if rank is None else f"rank {rank}"
                event(
                    "ledger",
                    f"{'first ledger' if not opens else 'new incarnation'} of {who}: {path.name}, "
                    f"pid {tail.header.pid}, world size {tail.header.world_size}",
                    rank=rank,
                    pid=tail.header.pid,
                    path=str(path),
                )
            if opens and tail.opens > opens:
                # A new incarnation of the process (its ledger was replaced): the old one's open
                # step died with it, and a fresh server counts as progress even before traffic.
                if rank is None:
                    self._detector.forget_engine()
                else:
                    self._detector.forget_rank(rank)
                    self.monitor.forget_rank(rank)
                progressed = True
            progressed = progressed or bool(records)
            self._detector.observe(rank, records)
            self.monitor.observe(rank, records)
            if self.on_records is not None:
                self.on_records(rank, records)
        self.progressed = progressed
        if progressed:
            self._fired = False
        if self._detector.learned_floor_s > self._floor_logged:
            self._floor_logged = self._detector.learned_floor_s
            event(
                "deadline",
                f"stall floor raised to {self._floor_logged:.2f} s: a stall was over after all (a slow step, not a "
                f"hang); at most {self.detector_cfg.max_floor_s:g} s",
                floor_s=round(self._floor_logged, 3),
            )
        exited = self._exits()
        if exited is not None:
            return exited  # at once, and whatever fired before: the server may tear itself down next
        now = time.monotonic_ns() if now_ns is None else now_ns
        # Ranks out of step are an incident at once, stall or not (the monitor reports each once).
        odd = self.monitor.check(now)
        if odd is not None:
            log.info("ranks out of step at step %s: %s", odd.step, odd.reason)
            return StallInfo("divergence", odd.step, odd.lag_s, self.monitor.grace_s, odd.ranks if odd.lag_s else ())
        stall = self._detector.check(now)
        if stall is None or self._fired:
            return None
        self._fired = True
        return stall

    def _exits(self) -> StallInfo | None:
        """A rank's process that is gone (or a zombie) while its deployment was working: an incident now.

        vLLM tears the whole server down within about a second of a worker's death, so the evidence
        is gathered now, not at a stall deadline; an idle deployment (nothing open, nothing pending)
        that loses a process is stopping, not failing. A pid counts only once some rank's pid was seen
        running (this agent shares the ranks' pid namespace), and ranks that die after a stall was
        already reported (and before any progress) belong to it."""
        gone: list[tuple[int, int]] = []
        unseen: list[tuple[int, int]] = []
        for t in self._tails.values():
            h = t.header
            if h is None or h.kind is ProcessKind.ENGINE or h.pid in self._exited:
                continue
            if _running(self.sources.proc_root, h.pid):
                self._alive.add(h.pid)
            elif h.pid in self._alive:
                gone.append((h.rank, h.pid))
            else:
                unseen.append((h.rank, h.pid))
        # A pid never seen running is dead if its peers' pids are visible here (same pid namespace):
        # it died before this agent's first look (an agent started late, or a rank that died at once).
        if self._alive:
            gone += unseen
        if not gone or not self._detector.busy():
            return None  # checked again next poll: a dead rank stays dead
        self._exited.update(pid for _, pid in gone)
        if self._fired:
            return None  # the stall already diagnosed: these went with it (vLLM's teardown), no new incident
        step = self._detector.open_step([r for r, _ in gone])
        self._fired = True
        log.info("rank %s exited during step %s", ", ".join(str(r) for r, _ in sorted(gone)), step)
        return StallInfo("process_exit", step, 0.0, 0.0, tuple(sorted(r for r, _ in gone)))

    def stall_floor_s(self) -> float:
        return self._detector.floor_s()

    def rank_pids(self) -> dict[int, int]:
        """pid -> TP rank, from the headers of the worker ledgers read so far."""
        return {
            t.header.pid: t.header.rank
            for t in self._tails.values()
            if t.header is not None and t.header.kind is not ProcessKind.ENGINE
        }

    def handle(self, stall: StallInfo | None) -> Incident:
        """Gather, diagnose, write the bundle (``stall`` None: a diagnosis asked for by hand)."""
        detected = time.monotonic_ns()
        snapshot, ledgers, evidence = gather(self.ledger_dir, self.sources, stall, self.ranks)
        return conclude(self.incidents_dir, snapshot, ledgers, evidence, stall, detected, self.analyzer_cfg)

    def rings(self) -> tuple[RingState | None, dict[int, RingState]]:
        """The flags of the deployment's shm rings: the broadcast ring, and each rank's response ring."""
        path = self.ledger_dir / ledger_name(ProcessKind.ENGINE, 0)
        if self.ranks is not None and 0 not in self.ranks:
            return None, {}  # the engine (and its rings) live on another node
        try:
            ino = path.stat().st_ino
        except OSError:
            return None, {}
        now = time.monotonic()
        if self._ring_specs is None or self._ring_specs[0] != ino:
            if now < self._ring_retry_at:
                return None, {}
            specs, _ = find_ring_specs(
                read_ledger_dir(self.ledger_dir, self.ranks), self.sources.shm_dir, self.sources.proc_root
            )
            if not specs:
                self._ring_retry_at = now + 10.0  # start-up, or discovery found nothing: not every second
                return None, {}
            self._ring_specs = (ino, specs)
            names = ", ".join(
                f"{role} {spec.get('name', '?') if isinstance(spec, dict) else '?'}" for role, spec in specs
            )
            event("rings", f"watching vLLM shm rings: {names}", rings=len(specs))
        states, missing = read_rings(self._ring_specs[1], self.sources.shm_dir)
        for m in missing:
            log.debug("%s", m)
            self._error("ring")
        broadcast = next((st for st in states if st.role == "broadcast"), None)
        responses = [st for st in states if st.role == "response"]
        return broadcast, dict(enumerate(responses))  # response rings come in rank order

    def _error(self, source: str) -> None:
        if self.on_error is not None:
            self.on_error(source)

    def close(self) -> None:
        for tail in self._tails.values():
            tail.close()


def _running(proc_root: str, pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it exited and was not reaped yet)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def log_evidence(evidence: dict[str, Any], seconds: float) -> None:
    missing = evidence.get("missing") or []
    event(
        "evidence",
        f"evidence gathered in {seconds:.2f} s: {len(evidence.get('pids') or {})} processes, "
        f"{len(evidence.get('stacks') or {})} stacks, {len(evidence.get('rings') or [])} rings, {len(missing)} missing",
        seconds=round(seconds, 3),
        missing=missing[:20],
    )


def conclude(
    incidents_dir: Path,
    snapshot: Snapshot,
    ledgers: LedgerSet,
    evidence: dict[str, Any],
    stall: StallInfo | None,
    detected: int,
    cfg: AnalyzerConfig,
) -> Incident:
    """Evidence gathered (since ``detected``, monotonic ns) -> diagnosis, report, bundle, timings: the
    end of an incident, the same for an agent and a coordinator."""
    gathered = time.monotonic_ns()
    log_evidence(evidence, (gathered - detected) / 1e9)
    diagnosis = diagnose(snapshot, cfg)
    report = render(diagnosis)
    analyzed = time.monotonic_ns()
    recovered = stall is not None and diagnosis.verdict is Verdict.NO_DEADLOCK
    if stall is not None and recovered:
        bundle = record_recovered(incidents_dir, diagnosis, stall)
    else:
        bundle = write_bundle(incidents_dir, ledgers, evidence, diagnosis, report, page_context(detected, analyzed))
    done = time.monotonic_ns()
    timings = {
        "gather": (gathered - detected) / 1e9,
        "analyze": (analyzed - gathered) / 1e9,
        "write": (done - analyzed) / 1e9,
    }
    return Incident(diagnosis, bundle, report, stall, detected, done, timings, recovered)

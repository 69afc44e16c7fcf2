"""Gathering evidence into a frozen Snapshot, live or from stored files.

``gather`` reads every ledger in a directory, then in parallel and bounded in time: stacks of
every process (py-spy, Python and native), process state (psutil), GPUs (NVML) and the shm
rings named in the engine ledger. Whatever fails becomes a "missing: ..." line, never a crash.
The same ``assemble`` builds the Snapshot from a live gather and from an incident bundle, so
``watchdog diagnose`` re-runs exactly what the live agent ran.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collectors.capture import capture
from collectors.format import ProcessKind
from collectors.reader import Ledger, LedgerError, ledger_paths, parse_ledger
from watchdog.evidence import EvidenceError, json_field, json_value
from watchdog.evidence.discover import deployment_specs, discover_rings
from watchdog.evidence.gpus import GpuSource
from watchdog.evidence.procs import ProcSource, PsutilProcs
from watchdog.evidence.rings import RingError, RingLayout, inspect_ring
from watchdog.evidence.stacks import PySpy, StackSource, dump_many
from watchdog.evidence.titles import worker_titles
from watchdog.types import (
    EVIDENCE_SCHEMA,
    GpuInfo,
    ProcessEvidence,
    ProcInfo,
    RingState,
    Snapshot,
    StackDump,
    StallInfo,
)


@dataclass
class Sources:
    """Where evidence comes from. Each edge can be None (not collected) or a fake in tests."""

    stacks: StackSource | None = field(default_factory=PySpy)
    procs: ProcSource | None = field(default_factory=PsutilProcs)
    gpus: GpuSource | None = None
    shm_dir: str = "/dev/shm"
    proc_root: str = "/proc"
    native: bool = True
    stack_timeout_s: float = 5.0
    native_timeout_s: float = 2.0  # informational only: never let it hold up a diagnosis
    proc_sample_s: float = 0.3


@dataclass(frozen=True)
class LedgerSet:
    ranks: dict[int, Ledger]
    engine: Ledger | None
    raw: dict[str, bytes]  # file name -> bytes exactly as read (what a bundle stores)
    missing: tuple[str, ...]


def read_ledger_files(files: Mapping[str, bytes]) -> LedgerSet:
    ranks: dict[int, Ledger] = {}
    engine: Ledger | None = None
    missing: list[str] = []
    for name, data in sorted(files.items()):
        try:
            ledger = parse_ledger(data, name)
        except LedgerError as exc:
            missing.append(f"ledger {exc}")
            continue
        missing.extend(ledger.problems)
        if ledger.header.kind is ProcessKind.ENGINE:
            if engine is None or ledger.header.start_wall_ns > engine.header.start_wall_ns:
                engine = ledger
            continue
        old = ranks.get(ledger.rank)
        if old is None or ledger.header.start_wall_ns > old.header.start_wall_ns:
            ranks[ledger.rank] = ledger
    world = max([lg.header.world_size for lg in ranks.values()] + [engine.header.world_size if engine else 0])
    missing.extend(_absent(world, ranks))
    if engine is None:
        missing.append("engine: no ledger (no referee for expected graph keys, no pending-request count)")
    return LedgerSet(ranks, engine, dict(files), tuple(missing))


def _absent(world: int, ranks: Mapping[int, Ledger]) -> list[str]:
    """One line per rank of ``world`` without a ledger; runs of them as one line (a world size is
    bounded by the header check, but thousands of lines would drown the report)."""
    gone = [r for r in range(world) if r not in ranks]
    if len(gone) <= 8:
        return [f"rank {r}: no ledger" for r in gone]
    return [f"ranks {', '.join(map(str, gone[:4]))}, ... {gone[-1]}: no ledger ({len(gone)} of {world} ranks)"]


MAX_LEDGER_FILES = 1024  # far above any TP deployment; a directory with more is not one deployment's


def read_ledger_dir(directory: str | Path, ranks: frozenset[int] | None = None) -> LedgerSet:
    """Every ledger in ``directory`` (``ranks``' only, if given), each captured safely from a live writer
    (``collectors.capture``): the bytes kept for a bundle hold no torn record either."""
    files: dict[str, bytes] = {}
    unreadable: list[str] = []
    paths = ledger_paths(directory, ranks)
    if len(paths) > MAX_LEDGER_FILES:
        unreadable.append(f"ledgers: {len(paths) - MAX_LEDGER_FILES} of {len(paths)} files in {directory} ignored")
        paths = paths[:MAX_LEDGER_FILES]
    for path in paths:
        try:
            files[path.name] = capture(path)
        except LedgerError as exc:
            unreadable.append(f"ledger {exc}")
    got = read_ledger_files(files)
    return LedgerSet(got.ranks, got.engine, got.raw, (*unreadable, *got.missing))


# ---- the shm rings as evidence.json holds them -----------------------------------------

MAX_RING_READERS = 1 << 12
MAX_RING_CHUNKS = 1 << 16


def ring_from_json(d: Any) -> RingState:
    """``RingState.from_json`` within bounds; ValueError naming the bad field: every chunk must hold its
    written flag and one read flag per reader, so the analyzer can index any reader of any chunk."""
    n = json_field(d, "n_readers", int, "ring")
    chunks = json_field(d, "chunks", list, "ring")
    if not 0 <= n <= MAX_RING_READERS or len(chunks) > MAX_RING_CHUNKS:
        raise ValueError(f"ring: {n} readers, {len(chunks)} chunks: out of range")
    ring = RingState.from_json(d)
    for i, c in enumerate(ring.chunks):
        if len(c.read) != n:
            raise ValueError(f"ring.chunks[{i}]: expected {1 + n} flags of 0 or 1 (written, then one per reader)")
    return ring


def ring_specs(engine: Ledger) -> list[tuple[str, Any]] | None:
    """(role, spec) of each shm ring the engine ledger names; None if it names none."""
    entry = next((m for m in reversed(engine.meta) if m.get("t") == "rings"), None)
    if entry is None:
        return None
    responses = entry.get("responses")
    # a damaged entry names no response rings (read_rings reports a damaged spec as a missing ring)
    return [("broadcast", entry.get("broadcast"))] + [
        ("response", r) for r in responses or () if isinstance(responses, list)
    ]


def known_pids(ledgers: LedgerSet) -> dict[int, str]:
    """pid -> "engine" or the rank, from the ledger headers."""
    known = {lg.header.pid: str(r) for r, lg in ledgers.ranks.items()}
    if ledgers.engine is not None:
        known[ledgers.engine.header.pid] = "engine"
    return known


def find_ring_specs(ledgers: LedgerSet, shm_dir: str, proc_root: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The (role, spec) of each ring: as the engine ledger names them, else found in ``shm_dir`` by shape
    and by which of the deployment's processes map them (watchdog.evidence.discover)."""
    if ledgers.engine is None:
        return [], []
    named = ring_specs(ledgers.engine)
    if named is not None:
        return named, []
    found = deployment_specs(discover_rings(shm_dir, proc_root, known_pids(ledgers)), known_pids(ledgers))
    if found is None:
        return [], [f"rings: the engine ledger names none and none of this deployment's were found in {shm_dir}"]
    return found, []


def read_rings(specs: list[tuple[str, Any]], shm_dir: str) -> tuple[list[RingState], list[str]]:
    states: list[RingState] = []
    missing: list[str] = []
    for role, spec in specs:
        try:
            layout = RingLayout.from_json(spec)
            states.append(inspect_ring(str(spec["name"]), layout, role, shm_dir=shm_dir))
        except (RingError, KeyError, TypeError, ValueError) as exc:
            missing.append(f"ring {role}: {exc}")
    return states, missing


def gather(
    directory: str | Path, sources: Sources, stall: StallInfo | None = None, ranks: frozenset[int] | None = None
) -> tuple[Snapshot, LedgerSet, dict[str, Any]]:
    """Collect everything about the deployment whose ledgers are in ``directory`` (only ``ranks``' if given)."""
    ledgers = read_ledger_dir(directory, ranks)
    evidence = collect(ledgers, sources, stall)
    return assemble(ledgers, evidence), ledgers, evidence


def collect(ledgers: LedgerSet, sources: Sources, stall: StallInfo | None = None) -> dict[str, Any]:
    """The JSON evidence about the processes behind ``ledgers``: stacks, process and GPU state, rings."""
    t0_mono, t0_wall = time.monotonic_ns(), time.time_ns()
    pids = {label: pid for pid, label in known_pids(ledgers).items()}
    missing: list[str] = []
    evidence: dict[str, Any] = {"pids": pids}
    with ThreadPoolExecutor(max_workers=4) as pool:
        stacks_f = (
            pool.submit(dump_many, sources.stacks, list(pids.values()), native=False, timeout_s=sources.stack_timeout_s)
            if sources.stacks
            else None
        )
        native_f = (
            pool.submit(dump_many, sources.stacks, list(pids.values()), native=True, timeout_s=sources.native_timeout_s)
            if sources.stacks and sources.native
            else None
        )
        procs_f = pool.submit(_procs, sources, list(pids.values())) if sources.procs else None
        gpus_f = pool.submit(sources.gpus.sample) if sources.gpus else None
        workers_f = pool.submit(worker_titles, sources.proc_root, list(pids.values()))
        specs, ring_missing = find_ring_specs(ledgers, sources.shm_dir, sources.proc_root)
        rings, unreadable = read_rings(specs, sources.shm_dir)
        missing.extend(ring_missing + unreadable)
        for label, fut in (("stacks", stacks_f), ("native_stacks", native_f)):
            if fut is None:
                missing.append(f"{label}: not collected (disabled)")
                continue
            out: dict[str, Any] = {}
            for pid, res in fut.result().items():
                if isinstance(res, EvidenceError):
                    missing.append(f"{label} of pid {pid}: {res}")
                else:
                    out[str(pid)] = res.to_json()
            evidence[label] = out
        if procs_f is None:
            missing.append("process state: not collected (disabled)")
        else:
            procs, proc_missing = procs_f.result()
            evidence["procs"] = procs
            missing.extend(proc_missing)
        if gpus_f is None:
            missing.append("gpus: not collected (no GPU source)")
        else:
            try:
                evidence["gpus"] = [g.to_json() for g in gpus_f.result()]
            except EvidenceError as exc:
                missing.append(f"gpus: {exc}")
        workers = workers_f.result()
        if workers:  # absent (not empty) where no vLLM worker titles are seen: old bundles read the same
            evidence["workers"] = {str(pid): name for pid, name in sorted(workers.items())}
    # A process that is gone cannot be dumped: its death is the evidence, not a missing stack.
    dead = {pid for pid, p in evidence.get("procs", {}).items() if not p.get("alive", True)}
    missing = [m for m in missing if not any(f"pid {pid}:" in m for pid in dead)]
    evidence.update(
        schema=EVIDENCE_SCHEMA,
        taken_mono_ns=t0_mono,
        taken_wall_ns=t0_wall,
        boot_id=_boot_id(),
        live=True,
        rings=[r.to_json() for r in rings],
        missing=missing,
        stall=None if stall is None else dataclasses.asdict(stall),
    )
    return evidence


def _procs(sources: Sources, pids: list[int]) -> tuple[dict[str, Any], list[str]]:
    assert sources.procs is not None
    out: dict[str, Any] = {}
    missing: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(pids))) as pool:
        futs = {pid: pool.submit(sources.procs.info, pid, sample_s=sources.proc_sample_s) for pid in pids}
        for pid, fut in futs.items():
            try:
                out[str(pid)] = fut.result().to_json()
            except EvidenceError as exc:
                missing.append(f"process state of pid {pid}: {exc}")
    return out, missing


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _table(evidence: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """An optional object of the evidence (absent or null: empty); ValueError for any other type."""
    value = evidence.get(key)
    return {} if value is None else json_value(value, dict, key)


def _items(evidence: Mapping[str, Any], key: str) -> list[Any]:
    value = evidence.get(key)
    return [] if value is None else json_value(value, list, key)


def _stall(raw: Any) -> StallInfo | None:
    if not raw:
        return None
    step = json_field(raw, "step", object, "stall")
    return StallInfo(
        kind=json_field(raw, "kind", str, "stall"),
        step=None if step is None else json_value(step, int, "stall.step"),
        age_s=json_field(raw, "age_s", float, "stall"),
        deadline_s=json_field(raw, "deadline_s", float, "stall"),
    )


def assemble(ledgers: LedgerSet, evidence: Mapping[str, Any]) -> Snapshot:
    """Build the Snapshot from ledgers and the JSON evidence (live, or loaded from a bundle).

    Every field of the evidence is type-checked here, at the edge: a damaged one is a ValueError naming
    it (``watchdog diagnose`` prints it as one line), so the analyzer only ever sees well-typed data."""
    stacks = _table(evidence, "stacks")
    natives = _table(evidence, "native_stacks")
    procs = _table(evidence, "procs")

    def stack(pid: int, table: Mapping[str, Any]) -> StackDump | None:
        raw = table.get(str(pid))
        return None if raw is None else StackDump.from_json(raw)

    def proc(pid: int) -> ProcInfo | None:
        raw = procs.get(str(pid))
        return None if raw is None else ProcInfo.from_json(raw)

    def ev(rank: int | None, ledger: Ledger) -> ProcessEvidence:
        pid = ledger.header.pid
        return ProcessEvidence(rank, pid, ledger, stack(pid, stacks), stack(pid, natives), proc(pid))

    gpus: tuple[GpuInfo, ...] = tuple(GpuInfo.from_json(g) for g in _items(evidence, "gpus"))
    missing = list(ledgers.missing) + [json_value(m, str, "missing[]") for m in _items(evidence, "missing")]
    live = json_value(evidence.get("live", False), bool, "live")
    if not live:
        missing.append("stacks, process state and rings: none (post-mortem on ledgers alone)")
    return Snapshot(
        taken_mono_ns=json_value(evidence.get("taken_mono_ns", 0), int, "taken_mono_ns"),
        taken_wall_ns=json_value(evidence.get("taken_wall_ns", 0), int, "taken_wall_ns"),
        boot_id=json_value(evidence.get("boot_id", ""), str, "boot_id"),
        ranks={r: ev(r, lg) for r, lg in sorted(ledgers.ranks.items())},
        engine=None if ledgers.engine is None else ev(None, ledgers.engine),
        rings=tuple(ring_from_json(r) for r in _items(evidence, "rings")),
        gpus=gpus,
        missing=tuple(missing),
        stall=_stall(evidence.get("stall")),
        live=live,
        workers=_workers(_table(evidence, "workers")),
    )


def _workers(table: Mapping[str, Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for pid, name in table.items():
        if not pid.isdigit() or len(pid) > 10:
            raise ValueError(f"workers: {pid[:20]!r} is not a pid")
        out[int(pid)] = json_value(name, str, "workers[]")[:128]
    return out


SNAPSHOT_SCHEMA = "watchdog.snapshot/v1"  # a node's evidence as an agent serves it to a coordinator


def snapshot_payload(ledgers: LedgerSet, evidence: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SNAPSHOT_SCHEMA,
        "ledgers": {name: base64.b64encode(zlib.compress(data, 1)).decode() for name, data in ledgers.raw.items()},
        "evidence": evidence,
    }


def payload_ledgers(payload: dict[str, Any]) -> dict[str, bytes]:
    """Inverse of the ledger part of ``snapshot_payload``; ValueError if damaged."""
    if payload.get("schema") != SNAPSHOT_SCHEMA:
        raise ValueError(f"not a {SNAPSHOT_SCHEMA} payload")
    try:
        return {str(n): zlib.decompress(base64.b64decode(d)) for n, d in payload["ledgers"].items()}
    except (KeyError, TypeError, AttributeError, zlib.error, ValueError) as exc:
        raise ValueError(f"damaged ledgers in snapshot: {exc}") from None

"""Incident bundles: everything needed to re-run a diagnosis, written atomically.

    <incidents>/<id>/
        ledgers/*.ledger   the ledger bytes exactly as the analyzer read them
        evidence.json      stacks, process state, GPUs, rings, what was missing, the stall
        diagnosis.json     the Diagnosis (schema watchdog.diagnosis/v1)
        report.txt         the human report
        incident.html      the incident page (self-contained: opens from a copied bundle, offline)
        supervisor.json    what `watchdog run` decided about it (added after the fact, when it ran)
    <incidents>/recovered.jsonl
        one line per stall that was over by the time the evidence was read (a slow step, not a
        hang: verdict no_deadlock): not an incident, no bundle; rotated to .1 past 1 MiB

The bundle is built in a hidden temporary directory beside its final place and renamed into
place, so a reader never sees half an incident; files are fsynced first.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import replace
from html import escape
from pathlib import Path
from typing import Any

from collectors.bounds import JsonError, load_json
from collectors.capture import capture, open_regular
from collectors.reader import LedgerError
from watchdog.errors import InputError
from watchdog.incident import Incident
from watchdog.page import PageContext, render_page
from watchdog.snapshot import LedgerSet, assemble, read_ledger_dir, read_ledger_files
from watchdog.types import EVIDENCE_SCHEMA, Diagnosis, Snapshot, StallInfo

log = logging.getLogger("watchdog")
SUPERVISOR_FILE = "supervisor.json"


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bundle(
    incidents_dir: str | Path,
    ledgers: LedgerSet,
    evidence: dict[str, Any],
    diagnosis: Diagnosis,
    report: str,
    context: PageContext | None = None,
) -> Path:
    root = Path(incidents_dir)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    ident = f"{stamp}-{diagnosis.verdict.value}-{secrets.token_hex(3)}"
    tmp = root / f".{ident}.tmp"
    try:
        (tmp / "ledgers").mkdir(parents=True)
        for name, data in ledgers.raw.items():
            _write(tmp / "ledgers" / Path(name).name, data)
        _write(tmp / "evidence.json", json.dumps(evidence, indent=1, sort_keys=True).encode())
        _write(tmp / "diagnosis.json", json.dumps(diagnosis.to_json(), indent=1).encode() + b"\n")
        _write(tmp / "report.txt", report.encode())
        _write(tmp / "incident.html", _page(ledgers, evidence, diagnosis, report, context, ident).encode())
        final = root / ident
        os.rename(tmp, final)
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RECOVERED_FILE = "recovered.jsonl"
RECOVERED_MAX_BYTES = 1 << 20


def record_recovered(incidents_dir: str | Path, diagnosis: Diagnosis, stall: StallInfo) -> Path:
    """One line for a stall that was over by the time the evidence was read: what stalled, for how
    long against which deadline, and the diagnosis' summary. Past ``RECOVERED_MAX_BYTES`` the file
    moves to ``.1`` (replacing the previous one), so a server that hiccups all day holds 2 MiB."""
    root = Path(incidents_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / RECOVERED_FILE
    try:
        if path.stat().st_size >= RECOVERED_MAX_BYTES:
            os.replace(path, root / (RECOVERED_FILE + ".1"))
    except FileNotFoundError:
        pass
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stall": {"kind": stall.kind, "step": stall.step, "age_s": round(stall.age_s, 3),
                  "deadline_s": round(stall.deadline_s, 3)},
        "verdict": diagnosis.verdict.value,
        "summary": diagnosis.summary,
    }  # fmt: skip
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    return path


# evidence.json of a TP=8 deployment with native stacks is a few hundred KB; 16 MB is not evidence
MAX_EVIDENCE_BYTES = 16 << 20


def read_json(path: Path, max_bytes: int) -> Any:
    """A JSON file a bundle holds, its size and nesting bounded (``collectors.bounds.load_json``);
    InputError naming the file otherwise."""
    try:
        fd = open_regular(path)
    except LedgerError:
        raise InputError(f"{path}: cannot read (not a regular file, or missing)") from None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)  # never more than the bound, whatever the file claims
        return load_json(data, max_bytes)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except JsonError as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None


def page_context(detected_mono_ns: int, diagnosed_mono_ns: int) -> PageContext:
    """The page's detection time (on the wall clock) and how long the diagnosis took after it."""
    wall = time.time_ns() - (time.monotonic_ns() - detected_mono_ns)
    return PageContext(detected_wall_ns=wall, diagnosed_after_s=(diagnosed_mono_ns - detected_mono_ns) / 1e9)


def _page(
    ledgers: LedgerSet, evidence: dict[str, Any], diagnosis: Diagnosis, report: str, ctx: PageContext | None, ident: str
) -> str:
    ctx = ctx or PageContext()
    try:
        return render_page(assemble(ledgers, evidence), diagnosis, replace(ctx, incident=ident))
    except Exception as exc:
        log.exception("incident page for %s could not be drawn", ident)
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(ident)}</title></head><body>"
            f"<p>the page could not be drawn ({escape(type(exc).__name__)}: {escape(str(exc))}); the report:</p>"
            f"<pre>{escape(report)}</pre></body></html>\n"
        )


def load_supervisor(path: Path) -> dict[str, Any] | None:
    """What `watchdog run` recorded about this incident (supervisor.json), or None."""
    try:
        raw = read_json(path / SUPERVISOR_FILE, MAX_EVIDENCE_BYTES)
    except InputError:
        return None
    return raw if isinstance(raw, dict) else None


def record_supervisor(incident: Incident, info: dict[str, Any]) -> None:
    """Add the supervisor's decision to a written bundle and redraw its page with it (each file replaced
    atomically: a reader sees the old page or the new one)."""
    bundle = incident.bundle
    page = render_page(load_snapshot(bundle), incident.diagnosis, replace(_context(incident), supervisor=info))
    for name, data in (
        (SUPERVISOR_FILE, json.dumps(info, indent=1, sort_keys=True).encode()),
        ("incident.html", page.encode()),
    ):
        tmp = bundle / f".{name}.tmp"
        _write(tmp, data)
        os.replace(tmp, bundle / name)


def write_page(out: Path, source: Path, snapshot: Snapshot, diagnosis: Diagnosis) -> None:
    """``watchdog diagnose SOURCE --html OUT``: the page of a bundle (with what `watchdog run` recorded
    about it) or of a raw ledger directory."""
    ctx = PageContext(incident=source.name)
    if source.is_dir() and is_bundle(source):
        ctx = replace(ctx, supervisor=load_supervisor(source))
    try:
        out.write_text(render_page(snapshot, diagnosis, ctx))
    except OSError as exc:
        raise InputError(f"{out}: cannot write the page ({exc.strerror or exc})") from None


def bundle_time(ident: str) -> float | None:
    """When an incident was written (wall seconds), from its bundle's name; None if not one of ours."""
    try:
        return calendar.timegm(time.strptime(ident.split("-", 1)[0], "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def _context(incident: Incident) -> PageContext:
    return PageContext(
        incident=incident.bundle.name,
        detected_wall_ns=int((bundle_time(incident.bundle.name) or 0) * 1e9),
        diagnosed_after_s=(incident.diagnosed_mono_ns - incident.detected_mono_ns) / 1e9,
    )


def incident_page(incident: Incident, restarts: list[dict[str, Any]]) -> str:
    """The agent's ``/incidents/{id}``: the page drawn from the bundle now, with what `watchdog run`
    recorded (and the restart that followed, once known). If the bundle can no longer be read, the
    page written with it."""
    ctx = _context(incident)
    info = load_supervisor(incident.bundle)
    if restarts:
        info = {**(info or {}), "restarts": restarts}
    try:
        return render_page(load_snapshot(incident.bundle), incident.diagnosis, replace(ctx, supervisor=info))
    except InputError:
        try:
            return (incident.bundle / "incident.html").read_text()
        except OSError:
            return render_page(
                Snapshot(0, 0, "", {}, None, missing=(f"bundle {incident.bundle}: gone",), live=False),
                incident.diagnosis,
                ctx,
            )


def is_bundle(path: Path) -> bool:
    # exists, not is_file: an evidence.json that is not a file is a damaged bundle, said as such
    return os.path.lexists(path / "evidence.json")


def load_snapshot(path: str | Path) -> Snapshot:
    """A Snapshot from an incident bundle, or from a raw ledger directory (post-mortem)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".ledger":
            try:
                ledgers = read_ledger_files({p.name: capture(p)})
            except LedgerError as exc:
                raise InputError(str(exc)) from None
            if not ledgers.ranks and ledgers.engine is None:
                raise InputError(ledgers.missing[0] if ledgers.missing else f"{p}: no readable ledger")
            return assemble(ledgers, {})
        raise InputError(f"{p}: not an incident bundle or ledger directory (expected a directory)")
    if is_bundle(p):
        evidence = read_json(p / "evidence.json", MAX_EVIDENCE_BYTES)
        if not isinstance(evidence, dict) or evidence.get("schema") != EVIDENCE_SCHEMA:
            raise InputError(f"{p / 'evidence.json'}: not watchdog evidence (schema {EVIDENCE_SCHEMA} expected)")
        ledgers = read_ledger_dir(p / "ledgers")
        try:
            return assemble(ledgers, evidence)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # assemble names the bad field
            raise InputError(f"{p / 'evidence.json'}: damaged evidence ({exc})") from None
    ledgers = read_ledger_dir(p)
    if not ledgers.raw:
        raise InputError(f"{p}: no *.ledger files and no evidence.json: not a bundle or ledger directory")
    if not ledgers.ranks and ledgers.engine is None:
        raise InputError(f"{p}: no readable ledger ({'; '.join(ledgers.missing)})")
    return assemble(ledgers, {})

"""Incident bundles: everything needed to re-run a diagnosis, written atomically.

    <incidents>/<id>/
        ledgers/*.ledger   the ledger bytes exactly as the analyzer read them
        evidence.json      stacks, process state, GPUs, rings, what was missing, the stall
        diagnosis.json     the Diagnosis (schema watchdog.diagnosis/v1)
        report.txt         the human report

The bundle is built in a hidden temporary directory beside its final place and renamed into
place, so a reader never sees half an incident; files are fsynced first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from collectors.bounds import JsonError, load_json
from collectors.capture import capture, open_regular
from collectors.reader import LedgerError
from watchdog.errors import InputError
from watchdog.snapshot import LedgerSet, assemble, read_ledger_dir, read_ledger_files
from watchdog.types import EVIDENCE_SCHEMA, Diagnosis, Snapshot


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

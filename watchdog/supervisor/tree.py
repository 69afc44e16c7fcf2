"""Process-tree hygiene for a supervised server: start it so it cannot outlive us, stop all of it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from collectors.reader import LedgerError, read_ledger
from watchdog.demo.proc import die_with_parent
from watchdog.snapshot import ring_specs


def start_tree(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """The server in its own session (so its whole tree can be signalled), killed if we die."""
    return subprocess.Popen(list(argv), env=dict(env), start_new_session=True, preexec_fn=die_with_parent)


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the server's process group and every descendant, wait ``grace_s``, SIGKILL what is left."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def unlink_rings(ledger_dir: Path) -> None:
    """Remove the shm rings a dead deployment's engine ledger names (a SIGKILLed server leaves them)."""
    from multiprocessing import shared_memory

    try:
        specs = ring_specs(read_ledger(ledger_dir / "engine.ledger")) or []
    except LedgerError:
        return
    for _role, spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not name:
            continue
        try:
            shm = shared_memory.SharedMemory(name=str(name))
        except (FileNotFoundError, ValueError):
            continue
        shm.close()
        shm.unlink()  # also unregisters it from this process's resource tracker


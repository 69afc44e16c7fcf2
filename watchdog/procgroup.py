"""A ``watchdog`` command as a child in its own process group, and stopping that whole group.

Used by ``watchdog bench soak`` (the demo and agent it runs) and by the tests that run the CLI: a demo
leaves multiprocessing helpers (the resource tracker) in its group for a moment after it exits, so a
stop is "signal the leader, wait, then SIGKILL the group", never a kill of the leader alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def spawn_cli(args: list[str], log: Path, stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """``python -m watchdog.cli ARGS`` in its own process group; stderr (and stdout unless given) to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "watchdog.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else f,
            stderr=f,
            start_new_session=True,
        )


def stop_group(p: subprocess.Popen[bytes], first: signal.Signals = signal.SIGINT, grace_s: float = 20) -> None:
    """``first`` (SIGINT: the demo kills its tree and unlinks its shm rings on KeyboardInterrupt) while it
    runs, then SIGKILL to whatever is left of its process group (which outlives its leader while
    children such as multiprocessing's resource tracker finish)."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(grace_s)
    kill_group(p)


def live_pids(*, pgid: int | None = None, sid: int | None = None) -> list[int]:
    """The processes of process group ``pgid`` (or session ``sid``) that have not exited. A zombie has:
    ``kill(-pgid, 0)`` still finds one, and PID 1 in many containers reaps re-parented orphans late
    or never, so waiting for the group to be empty that way waits out every timeout."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _ppid, pgrp, session = f.read().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z" and (int(pgrp) == pgid or int(session) == sid):
            out.append(int(pid))
    return out


def kill_group(p: subprocess.Popen[bytes] | subprocess.Popen[str], grace_s: float = 5.0) -> None:
    """Give ``p``'s process group ``grace_s`` to end by itself (multiprocessing's resource tracker
    unlinks the queues' semaphores on its way out), then SIGKILL whatever is left, and reap ``p``."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (p.poll() is None or live_pids(pgid=p.pid)):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""

"""Process-tree hygiene for a supervised server: start it so it cannot outlive us, stop all of it.

"All of it" is more than the server's children at stop time. Real vLLM's workers outlive their
parent (they ignore SIGTERM once it is gone) and re-parent, to PID 1 or to the nearest subreaper.
So the tree is tracked while it runs, by three means, each closing another's gap:
- its session: the server starts in a session of its own, which its descendants keep unless they
  call setsid themselves (vLLM's do not);
- a subreaper: ``watchdog run`` asks Linux to re-parent its descendants' orphans to itself, so
  they stay in ``children(recursive=True)``;
- a /proc walk every ``track()``: every process ever seen in the tree is remembered by (pid, start
  time), so a pid reused by an unrelated process is never signalled, and one that left the session
  and lost its parent is still ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

import psutil

from collectors.reader import LedgerError, read_ledger
from watchdog.snapshot import ring_specs
from watchdog.supervisor.proc import become_subreaper, die_with_parent


def start_tree(argv: Sequence[str], env: Mapping[str, str], output: Path | None = None) -> subprocess.Popen[bytes]:
    """The server in its own session (so its whole tree can be signalled), killed if we die; its
    stdout and stderr appended to ``output`` if given (else ours)."""
    become_subreaper()
    parent = os.getpid()
    with open(output, "ab") if output is not None else contextlib.nullcontext() as out:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
            stdout=out,
            stderr=None if out is None else subprocess.STDOUT,
        )


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


class Tree:
    """Everything the server started, remembered as (pid, start time), whoever its parent is now."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.sid = proc.pid  # start_new_session: the server leads its own session
        self.members: dict[int, float] = {}
        try:
            self.started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            self.started = 0.0
        self.track()

    def track(self) -> None:
        """Add the processes of the tree now: the root's descendants and the session's processes."""
        found: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        # Our children in a session other than ours: orphans of the tree that left its session too
        # (we are their subreaper). What we start ourselves (py-spy, ...) stays in our session.
        with contextlib.suppress(psutil.Error, OSError):
            ours = os.getsid(0)
            for c in psutil.Process().children():
                if c.pid != self.proc.pid and _session(c.pid) not in (ours, None):
                    found += [c, *c.children(recursive=True)]
        for p in psutil.process_iter(["create_time"]):
            if p.pid in self.members or p.info["create_time"] is None or p.info["create_time"] < self.started:
                continue  # started before the server: not of its tree, whatever its session
            if _session(p.pid) == self.sid:
                found.append(p)
        me = os.getpid()
        for p in found:
            if p.pid == me:
                continue
            with contextlib.suppress(psutil.Error):
                if p.pid == self.proc.pid or p.create_time() >= self.started:
                    self.members.setdefault(p.pid, p.create_time())

    def alive(self) -> list[psutil.Process]:
        """The remembered processes that still exist (the same process: its pid and start time match)."""
        out = []
        for pid, created in list(self.members.items()):
            try:
                p = psutil.Process(pid)
                if not exited(p) and p.create_time() == created:
                    out.append(p)
                    continue
            except psutil.Error:
                pass
            self.members.pop(pid, None)
        return out


def exited(p: psutil.Process) -> bool:
    """Whether ``p`` is gone or a zombie; a zombie of ours (a child, or an orphan re-parented to us) is reaped."""
    try:
        if p.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return True
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(p.pid, os.WNOHANG)
    return True


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    """Wait until every process has exited, at most ``timeout_s``. An exited process that nobody has
    reaped yet (a zombie) is gone: ``psutil.wait_procs`` waits out its whole timeout on one whose parent
    is dead and whose new parent, PID 1 in many containers, reaps late or never."""
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
        pending = [p for p in pending if not exited(p)]
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float, tree: Tree | None = None) -> None:
    """SIGTERM the server's session, process group and every process of its tree, wait ``grace_s``,
    then SIGKILL whatever is left, until nothing of the tree is alive (workers that ignore SIGTERM,
    orphans re-parented to PID 1 or to us included)."""
    tree = tree or Tree(proc)
    tree.track()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    family = tree.alive()
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    wait_gone(family, grace_s)
    for _ in range(5):  # a process may fork while we kill: look again until the tree is empty
        tree.track()
        left = tree.alive()
        if not left:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        wait_gone(left, 10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    tree.alive()  # reaps the orphans that re-parented to us


def kill_tree(proc: BaseProcess) -> None:
    """SIGKILL a ``multiprocessing`` child and all its descendants (the demo's engine and workers), then reap it."""
    if proc.pid is None:
        return
    try:
        root = psutil.Process(proc.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_gone(family, 10)
    proc.join(timeout=5)


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

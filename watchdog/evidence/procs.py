"""Process state from psutil and /proc: alive, status, CPU, wchan and per-thread CPU over a window.

A process that is gone is evidence (``alive=False``), not an error; only being denied access is
an ``EvidenceError``. Per-thread CPU tells a rank spinning in host code (one thread burning a
core) from one blocked in the kernel (every thread idle).

Never reads cmdline or environ: they can hold secrets, and a demo's fault settings live there,
which the analyzer must never see.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import psutil

from watchdog.evidence import EvidenceError
from watchdog.types import ProcInfo


class ProcSource(Protocol):
    def info(self, pid: int, *, sample_s: float = 0.0) -> ProcInfo: ...


class PsutilProcs(ProcSource):
    """psutil for status and CPU times; ``proc_root`` for the files read directly (wchan, comm).

    psutil itself always reads the live /proc (its root is process-global state, not ours to move).
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = Path(proc_root)

    def info(self, pid: int, *, sample_s: float = 0.0) -> ProcInfo:
        if pid <= 0:
            raise EvidenceError("psutil", f"invalid pid {pid}")
        try:
            proc = psutil.Process(pid)
            thread_cpu = self._thread_cpu(proc, sample_s) if sample_s > 0 else {}
            with proc.oneshot():
                status = proc.status()
                cpu = proc.cpu_times()
                num_threads = proc.num_threads()
        except psutil.ZombieProcess:  # before NoSuchProcess: it is a subclass
            status = psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return ProcInfo(pid, alive=False)
        except psutil.AccessDenied:
            raise EvidenceError("psutil", f"access denied to pid {pid}") from None
        if status == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: its counters say nothing now
            return ProcInfo(pid, alive=False, status=psutil.STATUS_ZOMBIE)
        return ProcInfo(
            pid,
            alive=True,
            status=str(status),
            cpu_user_s=cpu.user,
            cpu_system_s=cpu.system,
            num_threads=num_threads,
            wchan=self._wchan(pid),
            thread_cpu_s=thread_cpu,
        )

    def _thread_cpu(self, proc: psutil.Process, sample_s: float) -> dict[str, float]:
        """CPU seconds each thread used during a ``sample_s`` window, keyed by thread name."""
        before = {t.id: t.user_time + t.system_time for t in proc.threads()}
        time.sleep(sample_s)
        after = {t.id: t.user_time + t.system_time for t in proc.threads()}
        # A thread born inside the window used all of its CPU time inside it.
        used = {tid: max(0.0, cpu - before.get(tid, 0.0)) for tid, cpu in after.items()}
        return {name: round(used[tid], 3) for tid, name in self._thread_names(proc.pid, used).items()}

    def _wchan(self, pid: int) -> str:
        try:
            value = (self.proc_root / str(pid) / "wchan").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return ""
        return "" if value == "0" else value  # the kernel writes 0 for a task that is not waiting

    def _thread_names(self, pid: int, tids: Mapping[int, float]) -> dict[int, str]:
        """tid -> a unique key: the thread's comm, "comm#tid" for a repeated comm, str(tid) if unreadable."""
        names: dict[int, str] = {}
        seen: set[str] = set()
        for tid in sorted(tids):  # lowest tid (usually the main thread) keeps the plain name
            try:
                comm = (self.proc_root / str(pid) / "task" / str(tid) / "comm").read_text().strip()
            except (OSError, UnicodeDecodeError):
                comm = ""
            name = comm or str(tid)
            if name in seen:
                name = f"{name}#{tid}"
            seen.add(name)
            names[tid] = name
        return names


class FakeProcs(ProcSource):
    """Canned infos (or canned errors) per pid; a pid it does not know is a dead process."""

    def __init__(self, infos: Mapping[int, ProcInfo | EvidenceError]) -> None:
        self.infos = dict(infos)
        self.calls: list[tuple[int, float]] = []

    def info(self, pid: int, *, sample_s: float = 0.0) -> ProcInfo:
        self.calls.append((pid, sample_s))
        got = self.infos.get(pid, ProcInfo(pid, alive=False))
        if isinstance(got, EvidenceError):
            raise got
        return got

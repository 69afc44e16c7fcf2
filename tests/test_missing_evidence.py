"""Evidence sources failing on a real hung deployment: each failure becomes a "missing:" line in
the snapshot and the diagnosis, never a crash, and the verdict never claims health.

One TP=2 demo deployment hangs on the host (rank 1); the test then gathers from it with py-spy
missing, py-spy refused by the kernel, NVML absent (no GPU here), and finally with rank 1's process
killed in the middle of the collection."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import start, stop
from watchdog.analyzer import diagnose
from watchdog.evidence.gpus import Nvml
from watchdog.evidence.procs import PsutilProcs
from watchdog.evidence.stacks import PySpy
from watchdog.snapshot import Sources, gather
from watchdog.types import Diagnosis, ProcInfo, StackDump, Verdict
from watchdog.watcher import Watcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DENIED = "Error: Permission Denied: Try running again with elevated permissions by going 'sudo env \"PATH=$PATH\" !!'"


def _fake_pyspy(tmp: Path, stderr: str) -> str:
    path = tmp / "py-spy"
    path.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit 1\n")
    path.chmod(0o755)
    return str(path)


class _Vanish:
    """Kills one rank's process the moment a collector first touches it, then collects as usual."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self, pid: int) -> None:
        if pid == self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Not our child: it is gone once its parent reaps it, a zombie until then.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class VanishingStacks(PySpy):
    def __init__(self, vanish: _Vanish) -> None:
        super().__init__()
        self.vanish = vanish

    def dump(self, pid: int, *, native: bool = False, timeout_s: float = 5.0) -> StackDump:
        self.vanish.kill(pid)
        return super().dump(pid, native=native, timeout_s=timeout_s)


class VanishingProcs(PsutilProcs):
    def __init__(self, vanish: _Vanish) -> None:
        super().__init__()
        self.vanish = vanish

    def info(self, pid: int, *, sample_s: float = 0.3) -> ProcInfo:
        self.vanish.kill(pid)
        return super().info(pid, sample_s=sample_s)


def _diagnose(ledgers: Path, sources: Sources) -> Diagnosis:
    snapshot, _, _ = gather(ledgers, sources)
    return diagnose(snapshot)


def test_failing_sources_are_missing_lines_on_a_real_hang(tmp_path: Path) -> None:
    work = tmp_path / "w"
    ledgers = work / "ledgers"
    ledgers.mkdir(parents=True)
    demo = start(
        ["demo", "--no-watch", "--tp", "2", "--fault", "host-hang", "--workdir", str(work), "--timeout", "200"]
    )
    watcher = Watcher(ledgers, tmp_path / "inc", Sources(stacks=None, procs=None))
    try:
        deadline = time.monotonic() + 150
        while watcher.poll() is None:
            assert time.monotonic() < deadline, "the demo never hung"
            time.sleep(0.1)
        base = Sources(native=False)
        assert _diagnose(ledgers, base).verdict is Verdict.HOST_HANG

        missing_pyspy = _diagnose(ledgers, Sources(stacks=PySpy(executable=str(tmp_path / "nope")), native=False))
        assert missing_pyspy.verdict is not Verdict.NO_DEADLOCK
        assert sum("stacks of pid" in m and "not found" in m for m in missing_pyspy.missing) == 3, missing_pyspy.missing

        denied = _diagnose(ledgers, Sources(stacks=PySpy(executable=_fake_pyspy(tmp_path, DENIED)), native=False))
        assert denied.verdict is not Verdict.NO_DEADLOCK
        assert sum("stacks of pid" in m and "ermission" in m for m in denied.missing) == 3, denied.missing

        no_gpu = _diagnose(ledgers, Sources(gpus=Nvml(), native=False))
        assert no_gpu.verdict is Verdict.HOST_HANG
        assert any(m.startswith("gpus:") and "NVML" in m for m in no_gpu.missing), no_gpu.missing

        rank1 = _pid_of(ledgers, 1)
        vanish = _Vanish(rank1)
        gone = _diagnose(ledgers, Sources(stacks=VanishingStacks(vanish), procs=VanishingProcs(vanish), native=False))
        assert not _alive(rank1)
        assert gone.verdict is Verdict.WORKER_DEAD and list(gone.culprit_ranks) == [1], gone.summary
    finally:
        watcher.close()
        stop(demo)


def _pid_of(ledgers: Path, rank: int) -> int:
    from collectors.reader import read_ledger

    return read_ledger(ledgers / f"rank{rank:03d}.ledger").header.pid

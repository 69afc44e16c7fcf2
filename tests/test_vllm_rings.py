"""vLLM's real ``MessageQueue`` between real processes, one worker made to stall, inspected from outside.

tests/vllm_rings_child.py runs an engine (broadcast writer, response reader) and three forked workers
(broadcast readers; rank 0 replies) with vLLM's own ``MessageQueue`` and pauses at each interesting
state. Meanwhile this process, which never imports vLLM, does what the agent does: reads the ledger
directory, finds the rings (named by the engine ledger's ``rings`` entry, and again by discovery from
/dev/shm and /proc), reads their flags (``watchdog.snapshot.read_rings``) and classifies them
(``watchdog.analyzer.rings.classify``). The stalled reader must be named, the writer-side "no free
block" state and the "read but never replied" state told apart.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

from vllm_envs import VERSIONS, child_env, python_or_skip

from watchdog.analyzer.diagnose import diagnose
from watchdog.analyzer.rings import classify, describe
from watchdog.evidence.discover import deployment_specs, discover_rings
from watchdog.snapshot import Sources, gather, known_pids
from watchdog.types import RingState, RingVerdict, Verdict

pytestmark = pytest.mark.vllm  # runs real vLLM code (environments built once by tests/vllm_envs.py)

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).parent / "vllm_rings_child.py"
SHM = "/dev/shm"
NO_BLOCK = "No available shared memory broadcast block found"


class Child:
    """The scenario process: STATE lines out, one line in to go on. Killed and its segments removed on close."""

    def __init__(self, version: str, scenario: str, tmp: Path) -> None:
        self.log_path = tmp / f"{scenario}.log"
        self.ledgers = tmp / "ledgers"
        python = python_or_skip(version)  # before anything is opened: it may skip or fail
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [str(python), str(CHILD), scenario],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=child_env(
                WATCHDOG_LEDGER_DIR=str(self.ledgers),
                VLLM_RINGBUFFER_WARNING_INTERVAL="1",
                VLLM_LOGGING_LEVEL="INFO",
            ),
            start_new_session=True,  # its own process group: the workers die with it
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.names: set[str] = set()
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._pump_thread.start()

    def _pump(self, out: IO[str] | None) -> None:
        assert out is not None
        for line in out:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, tag: str, timeout: float = 150) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no {tag} line from the child within {timeout} s; log: {self.log()[-2000:]}")
            if line is None:
                pytest.fail(f"child exited ({self.proc.wait()}) before {tag}; log: {self.log()[-3000:]}")
            if line.startswith(tag + " "):
                state: dict[str, Any] = json.loads(line[len(tag) + 1 :])
                self.names.update([state.get("broadcast", ""), *state.get("responses", ())])
                return state

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(20)
            except Exception:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        else:  # workers left behind by a child that died early
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._pump_thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for name in self.names - {""}:
            Path(SHM, name).unlink(missing_ok=True)
        self._log.close()


def inspect(child: Child) -> tuple[RingVerdict, RingState, dict[int, RingState], Any]:
    """What the agent sees: the agent's own snapshot (ledgers, and the rings the engine ledger names,
    read from /dev/shm) through the analyzer; its diagnosis carries the ring verdict."""
    snap, ledgers, _ = gather(child.ledgers, Sources(stacks=None, procs=None, shm_dir=SHM))
    assert not [m for m in snap.missing if "ring" in m], snap.missing
    broadcast = next(s for s in snap.rings if s.role == "broadcast")
    responses = {i: s for i, s in enumerate(s for s in snap.rings if s.role == "response")}
    diag = diagnose(snap)
    assert diag.rings is not None, diag
    assert diag.rings == classify(broadcast, responses)
    assert f"rings: {diag.rings.summary}" in diag.evidence or diag.verdict is Verdict.NO_DEADLOCK
    assert diag.to_json()["rings"]["kind"] == diag.rings.kind
    return diag.rings, broadcast, responses, ledgers


def engine_lines(log: str, pid: int) -> list[str]:
    return [ln for ln in log.splitlines() if NO_BLOCK in ln and f"pid={pid} " in ln]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", VERSIONS)
def test_reader_that_stopped_reading_is_named(version: str, tmp_path: Path) -> None:
    child = Child(version, "stop_reading", tmp_path)
    try:
        st = child.next("STATE")
        assert st["phase"] == "reader_behind"
        verdict, bcast, responses, ledgers = inspect(child)
        assert bcast.name == st["broadcast"] and [r.name for r in responses.values()] == st["responses"]
        assert (bcast.n_readers, len(bcast.chunks)) == (3, 10)
        # steps 0..5 broadcast; reader 2 took 0..4
        assert [bcast.unread_by(r) for r in range(3)] == [0, 0, 1]
        assert (verdict.kind, verdict.readers) == ("reader_behind", (2,)), verdict
        assert "reader 2 (1 unread)" in verdict.summary
        assert "reader 2 has 1 unread" in describe(bcast)
        # The same rings found without the engine ledger's entry: by shape and by who maps them.
        pids = known_pids(ledgers)
        assert set(pids.values()) == {"engine", "0", "1", "2"}
        found = deployment_specs(discover_rings(SHM, "/proc", pids), pids)
        assert found is not None
        assert [(role, spec["name"], spec["n_readers"]) for role, spec in found] == [
            ("broadcast", st["broadcast"], 3),
            *[("response", name, 1) for name in st["responses"]],
        ]
        child.go()

        st = child.next("STATE")
        assert st["phase"] == "broadcast_full"
        # vLLM's own acquire_write gave up: 10 chunks ahead of reader 2 (steps 5..14), step 15 had no block
        assert st["enqueue_timeout_at_step"] == 15
        verdict, bcast, _, _ = inspect(child)
        assert [bcast.unread_by(r) for r in range(3)] == [0, 0, 10]
        assert (verdict.kind, verdict.readers) == ("broadcast_full", (2,)), verdict
        assert "no free block" in verdict.summary
        writer = engine_lines(child.log(), st["engine_pid"])
        assert writer and all("acquire_write" in ln for ln in writer), child.log()[-2000:]
        child.go()
        child.next("DONE")
    finally:
        child.close()
    assert not any(Path(SHM, n).exists() for n in child.names - {""})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", VERSIONS)
def test_worker_that_read_but_never_replied(version: str, tmp_path: Path) -> None:
    child = Child(version, "no_reply", tmp_path)
    try:
        st = child.next("STATE")
        assert st["phase"] == "awaiting_reply"
        assert st["dequeue_timeout_at_step"] == 3  # vLLM's dequeue on rank 0's response ring gave up
        verdict, bcast, responses, _ = inspect(child)
        assert [bcast.unread_by(r) for r in range(3)] == [0, 0, 0]
        assert sum(c.written for c in bcast.chunks) == 4  # steps 0..3, all taken
        assert [r.unread_by(0) for r in responses.values()] == [0, 0, 0]
        assert sum(c.written for c in responses[0].chunks) == 3  # replies to steps 0..2 only
        assert (verdict.kind, verdict.readers, verdict.ranks) == ("awaiting_reply", (), ()), verdict
        # The engine logs vLLM's same "No available ... block" line here, from the read side: the
        # message alone does not tell the two situations apart, the flags do.
        reader = engine_lines(child.log(), st["engine_pid"])
        assert reader and not any("acquire_write" in ln for ln in reader), child.log()[-2000:]
        child.go()
        child.next("DONE")
    finally:
        child.close()
    assert not any(Path(SHM, n).exists() for n in child.names - {""})


# ---- classify() on hand-made flags (no vLLM): every kind, and which readers / ranks it names -----------


def _ring(role: str, flags: list[list[int]]) -> RingState:
    """``flags``: per chunk [written, read by reader 0, 1, ...]."""
    from watchdog.types import RingChunk

    chunks = tuple(RingChunk(bool(f[0]), tuple(bool(x) for x in f[1:])) for f in flags)
    return RingState(f"psm_{role}", role, len(flags[0]) - 1, chunks)


def test_classify_every_kind() -> None:
    quiet = {0: _ring("response", [[1, 1], [0, 0], [0, 0]])}
    empty = _ring("broadcast", [[0, 0, 0, 0]] * 3)
    assert classify(empty, quiet).kind == "idle"
    assert classify(None, quiet).kind == "no_broadcast"
    # steps 0 and 1 broadcast; reader 1 missed step 1
    behind = _ring("broadcast", [[1, 1, 1, 1], [1, 1, 0, 1], [0, 0, 0, 0]])
    v = classify(behind, quiet)
    assert (v.kind, v.readers, v.ranks) == ("reader_behind", (1,), ())
    # every chunk written, reader 2 read none of them (reader 0 lags too, but has read the oldest)
    full = _ring("broadcast", [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0]])
    v = classify(full, quiet)
    assert (v.kind, v.readers) == ("broadcast_full", (2,))
    # everything read; rank 3's reply is waiting for the engine
    done = _ring("broadcast", [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    waiting = {0: quiet[0], 3: _ring("response", [[1, 1], [1, 0], [0, 0]])}
    v = classify(done, waiting)
    assert (v.kind, v.readers, v.ranks) == ("reply_unread", (), (3,))
    v = classify(done, quiet)
    assert (v.kind, v.readers, v.ranks) == ("awaiting_reply", (), ())

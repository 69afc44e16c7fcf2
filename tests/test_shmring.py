"""The demo's vLLM-layout shm ring between real processes, and its flags read from outside.

Readers run in spawned processes, as TP workers do. The stopped-reader test mirrors design.md's
check with real vLLM 0.33.0: a reader that stops leaves its flag 0 on every chunk, the writer's
enqueue times out, and a third process sees exactly that without touching the stuck one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.shmring_child import LAYOUT, inspect_from_outside, read_messages
from watchdog.analyzer.rings import describe
from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingError, RingLayout, inspect_ring
from watchdog.types import RingChunk

REPO = Path(__file__).resolve().parents[1]
CTX = mp.get_context("spawn")


# ---- helpers -------------------------------------------------------------------------------


def _start(*procs: Any) -> list[Any]:
    for p in procs:
        p.start()
    return list(procs)


def _stop(procs: list[Any], *rings: ShmRing) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)
    for ring in rings:
        ring.close()
        ring.unlink()


def _payload(i: int) -> dict[str, Any]:
    # Sizes vary, so a short message lands in a chunk that held a longer one: only the length
    # prefix may decide where it ends.
    return {"step": i, "pad": "x" * (i * 37 % 700)}


@pytest.fixture
def pair() -> Iterator[tuple[ShmRing, ShmRing]]:
    """A one-reader ring with both sides in this process (attach never registers with a tracker)."""
    layout = RingLayout(1, 2, 128)
    w = ShmRing.create(layout)
    r = ShmRing.attach(w.name, layout, reader_rank=0)
    try:
        yield w, r
    finally:
        r.close()
        w.close()
        w.unlink()


# ---- between processes ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_three_reader_processes_get_fifty_messages_in_order_across_wraps() -> None:
    ring = ShmRing.create(LAYOUT)
    out = CTX.Queue()
    procs: list[Any] = []
    try:
        layout = LAYOUT.to_json()
        procs = _start(*(CTX.Process(target=read_messages, args=(ring.name, layout, r, 50, out)) for r in range(3)))
        for i in range(50):  # 4 chunks: 12 wraps, each one waiting on the slowest reader
            ring.enqueue(_payload(i), timeout=30)
        results = dict(out.get(timeout=30) for _ in procs)
        for r in range(3):
            assert results[r] == [_payload(i) for i in range(50)], f"reader {r}"
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        state = inspect_ring(ring.name, LAYOUT, "broadcast")
        assert state.chunks == (RingChunk(True, (True, True, True)),) * 4
        assert describe(state).endswith(": 4 chunks written; readers 0,1,2 caught up")
    finally:
        _stop(procs, ring)


@pytest.mark.timeout(60)
def test_a_stopped_reader_blocks_the_writer_and_a_third_process_sees_which() -> None:
    ring = ShmRing.create(LAYOUT)
    out, gate = CTX.Queue(), CTX.Event()
    layout = LAYOUT.to_json()
    procs: list[Any] = []
    try:
        procs = _start(
            CTX.Process(target=read_messages, args=(ring.name, layout, 0, 9, out)),
            CTX.Process(target=read_messages, args=(ring.name, layout, 1, 9, out)),
            CTX.Process(target=read_messages, args=(ring.name, layout, 2, 10, out, 5, gate)),  # stops after 5
        )
        # Reader 2 read 0..4, so 5..8 still fit (chunks 1, 2, 3, 0); message 9 needs chunk 1 back.
        for i in range(9):
            ring.enqueue(i, timeout=30)
        reports = [out.get(timeout=30) for _ in range(3)]
        assert sorted(reports) == [(0, list(range(9))), (1, list(range(9))), (2, [0, 1, 2, 3, 4])]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not read by every reader"):
            ring.enqueue(9, timeout=0.5)
        assert time.monotonic() - t0 >= 0.5

        # Seen from outside, while reader 2 is alive but stuck: [written=1, r0=1, r1=1, r2=0] everywhere.
        spy = _start(CTX.Process(target=inspect_from_outside, args=(ring.name, layout, out)))
        procs += spy
        state, line = out.get(timeout=30)
        assert state.chunks == (RingChunk(True, (True, True, False)),) * 4
        assert (state.unread_by(0), state.unread_by(1), state.unread_by(2)) == (0, 0, 4)
        assert line == f"broadcast {ring.name}: 4 chunks written; reader 2 has 4 unread, readers 0,1 caught up"
        assert inspect_ring(ring.name, LAYOUT, "broadcast") == state  # and from here, equally read-only

        # The timed-out enqueue took nothing: once reader 2 resumes, the same message goes through.
        gate.set()
        ring.enqueue(9, timeout=30)
        assert out.get(timeout=30) == (2, [5, 6, 7, 8, 9])
    finally:
        _stop(procs, ring)


@pytest.mark.timeout(60)
def test_no_resource_tracker_noise_from_readers_or_the_creator() -> None:
    # The tracker is its own process: its KeyError tracebacks and "leaked shared_memory" warnings
    # never reach pytest's warning filter, only its stderr. So run a whole exchange in a fresh
    # interpreter and require a silent stderr.
    script = (
        "import multiprocessing as mp\n"
        "from tests.shmring_child import LAYOUT, read_messages\n"
        "from watchdog.demo.shmring import ShmRing\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn'); ring = ShmRing.create(LAYOUT); out = ctx.Queue()\n"
        "    lay = LAYOUT.to_json()\n"
        "    ps = [ctx.Process(target=read_messages, args=(ring.name, lay, r, 6, out)) for r in range(3)]\n"
        "    [p.start() for p in ps]\n"
        "    [ring.enqueue(i, timeout=30) for i in range(6)]\n"
        "    assert sorted(out.get(timeout=30) for _ in ps) == [(r, list(range(6))) for r in range(3)]\n"
        "    [p.join(30) for p in ps]\n"
        "    ring.close(); ring.unlink(); print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=50
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "ok", "")


# ---- one process, both sides ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_dequeue_times_out_when_nothing_is_written(pair: tuple[ShmRing, ShmRing]) -> None:
    _, r = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="nothing for reader 0"):
        r.dequeue(timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    with pytest.raises(TimeoutError):
        r.dequeue(timeout=0)


@pytest.mark.timeout(10)
def test_a_payload_that_does_not_fit_is_refused_and_the_ring_stays_usable(pair: tuple[ShmRing, ShmRing]) -> None:
    w, r = pair
    w.enqueue("before")
    with pytest.raises(ValueError, match="does not fit a 128-byte chunk"):
        w.enqueue(b"x" * 200)
    # Nothing was taken: chunk 1 is still free, chunk 0 still holds the unread "before".
    flags = inspect_ring(w.name, w.layout, "broadcast").chunks
    assert flags == (RingChunk(True, (False,)), RingChunk(False, (False,)))
    w.enqueue("after")
    assert [r.dequeue(timeout=1), r.dequeue(timeout=1)] == ["before", "after"]


@pytest.mark.timeout(10)
def test_each_side_keeps_to_its_role(pair: tuple[ShmRing, ShmRing]) -> None:
    w, r = pair
    with pytest.raises(RuntimeError, match="reads"):
        r.enqueue(1)
    with pytest.raises(RuntimeError, match="writes"):
        w.dequeue(timeout=0)
    with pytest.raises(ValueError, match="reader rank 1"):
        ShmRing.attach(w.name, w.layout, reader_rank=1)
    r.close()
    r.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        r.dequeue(timeout=0)


@pytest.mark.timeout(10)
def test_waiting_sides_show_vllms_frame_names(pair: tuple[ShmRing, ShmRing]) -> None:
    """The analyzer recognises an idle worker by ``acquire_read`` in its stack, as in vLLM."""
    w, r = pair

    def innermost(t: threading.Thread) -> str:
        assert t.ident is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(t.ident)
            if frame is not None and frame.f_code.co_name.startswith("acquire_"):
                return frame.f_code.co_name
            time.sleep(0.005)
        return "?"

    reading = threading.Thread(target=r.dequeue, kwargs={"timeout": 5})
    reading.start()
    assert innermost(reading) == "acquire_read"
    w.enqueue("go")
    reading.join(5)

    w.enqueue(1)
    w.enqueue(2)  # both chunks now unread: the next enqueue waits
    writing = threading.Thread(target=w.enqueue, args=(3,), kwargs={"timeout": 5})
    writing.start()
    assert innermost(writing) == "acquire_write"
    assert [r.dequeue(timeout=1) for _ in range(3)] == [1, 2, 3]
    writing.join(5)


# ---- reading from outside ------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_inspecting_a_missing_segment_is_one_line_naming_it() -> None:
    with pytest.raises(RingError) as err:
        inspect_ring("psm_does_not_exist", LAYOUT, "broadcast")
    assert "psm_does_not_exist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RingError, match="not a shared-memory segment name"):
        inspect_ring("../etc/passwd", LAYOUT, "broadcast")


@pytest.mark.timeout(10)
def test_inspecting_with_a_wrong_layout_is_one_line_naming_the_segment() -> None:
    ring = ShmRing.create(LAYOUT)
    try:
        for wrong in (RingLayout(2, 4, 1024), RingLayout(4, 4, 1024), RingLayout(3, 4, 512), RingLayout(3, 5, 1024)):
            with pytest.raises(RingError, match="layout needs") as err:
                inspect_ring(ring.name, wrong, "broadcast")
            assert ring.name in str(err.value) and "\n" not in str(err.value)
        # Same total size, different shape: the "flags" then overlap chunk 3's data, caught by their values.
        same_size = RingLayout(7, 4, 1020)
        assert same_size.total_size == LAYOUT.total_size
        for _ in range(4):
            ring.enqueue(b"\xff" * 1000)
        with pytest.raises(RingError, match="not 0/1") as err:
            inspect_ring(ring.name, same_size, "broadcast")
        assert "\n" not in str(err.value)
    finally:
        ring.close()
        ring.unlink()


@pytest.mark.timeout(10)
def test_layout_matches_vllms_shm_ring_buffer() -> None:
    # design.md: MessageQueue(3, 3, max_chunk_bytes=64 KiB, max_chunks=10) made 10 x 65536 + 10 x 4 bytes.
    vllm = RingLayout(n_readers=3, max_chunks=10, max_chunk_bytes=65536)
    assert vllm.total_size == 10 * 65536 + 10 * 4
    assert (vllm.data_offset(0), vllm.data_offset(9)) == (0, 9 * 65536)
    assert (vllm.metadata_offset(0), vllm.metadata_offset(9)) == (10 * 65536, 10 * 65536 + 36)
    with pytest.raises(IndexError):
        vllm.metadata_offset(10)
    assert RingLayout.from_json(vllm.to_json()) == vllm
    assert RingLayout.from_json({**vllm.to_json(), "name": "psm_1"}) == vllm  # the engine ledger's entry
    for bad in ({"n_readers": 3, "max_chunks": 10}, {**vllm.to_json(), "n_readers": True}, [3, 10, 1], None):
        with pytest.raises(ValueError, match="ring layout"):
            RingLayout.from_json(bad)
    with pytest.raises(ValueError, match="impossible"):
        RingLayout(0, 10, 65536)


@pytest.mark.timeout(10)
def test_describe_a_fresh_ring_and_a_single_lagging_reader() -> None:
    ring = ShmRing.create(RingLayout(2, 3, 64))
    try:
        assert describe(inspect_ring(ring.name, ring.layout, "response")).endswith(
            ": 0 chunks written; readers 0,1 caught up"
        )
        ring.enqueue(1)
        reader = ShmRing.attach(ring.name, ring.layout, reader_rank=0)
        try:
            assert reader.dequeue(timeout=1) == 1
        finally:
            reader.close()
        line = describe(inspect_ring(ring.name, ring.layout, "response"))
        assert line == f"response {ring.name}: 1 chunk written; reader 1 has 1 unread, reader 0 caught up"
    finally:
        ring.close()
        ring.unlink()

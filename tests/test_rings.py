"""The demo's vLLM-layout shm ring between real processes, and reading its flags from outside."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingError, RingLayout, describe, inspect_ring

LAYOUT = RingLayout(n_readers=3, max_chunks=4, max_chunk_bytes=1024)


def reader(name: str, rank: int, n: int, out: Any) -> None:
    ring = ShmRing.attach(name, LAYOUT, reader_rank=rank)
    got = [ring.dequeue(timeout=20) for _ in range(n)]
    out.put((rank, got))
    ring.close()


@pytest.mark.timeout(60)
def test_broadcast_in_order_to_every_reader_across_wraps() -> None:
    ctx = mp.get_context("spawn")
    ring = ShmRing.create(LAYOUT)
    out = ctx.Queue()
    procs = [ctx.Process(target=reader, args=(ring.name, r, 50, out)) for r in range(3)]
    try:
        for p in procs:
            p.start()
        for i in range(50):  # 4 chunks: the writer waits on the slowest reader 12 times over
            ring.enqueue({"step": i}, timeout=20)
        results = dict(out.get(timeout=30) for _ in procs)
        assert all(results[r] == [{"step": i} for i in range(50)] for r in range(3))
    finally:
        for p in procs:
            p.kill()
            p.join()
        ring.close()
        ring.unlink()


@pytest.mark.timeout(60)
def test_a_stopped_reader_blocks_the_writer_and_is_visible_from_outside() -> None:
    ctx = mp.get_context("spawn")
    ring = ShmRing.create(LAYOUT)
    out = ctx.Queue()
    procs = [ctx.Process(target=reader, args=(ring.name, r, 4 if r == 2 else 8, out)) for r in range(3)]
    try:
        for p in procs:
            p.start()
        for i in range(8):
            ring.enqueue(i, timeout=20)
        done = dict(out.get(timeout=30) for _ in procs)
        assert done[2] == [0, 1, 2, 3]
        with pytest.raises(TimeoutError):
            ring.enqueue("one too many", timeout=0.5)
        state = inspect_ring(ring.name, LAYOUT, "broadcast")
        assert all(c.written for c in state.chunks)
        assert [c.read for c in state.chunks] == [(True, True, False)] * 4
        assert state.unread_by(2) == 4 and state.unread_by(0) == 0
        assert "reader 2 has 4 unread" in describe(state)
    finally:
        for p in procs:
            p.kill()
            p.join()
        ring.close()
        ring.unlink()


def test_dequeue_timeout_and_oversized_message() -> None:
    w = ShmRing.create(RingLayout(1, 2, 64))
    r = ShmRing.attach(w.name, RingLayout(1, 2, 64), reader_rank=0)
    try:
        with pytest.raises(TimeoutError):
            r.dequeue(timeout=0.05)
        with pytest.raises(ValueError, match="does not fit"):
            w.enqueue(b"x" * 200)
        w.enqueue("ok")
        assert r.dequeue(timeout=1) == "ok"
    finally:
        r.close()
        w.close()
        w.unlink()


def test_inspect_missing_or_mismatched_segment_is_one_line() -> None:
    with pytest.raises(RingError) as err:
        inspect_ring("psm_does_not_exist", LAYOUT, "broadcast")
    assert "\n" not in str(err.value)
    ring = ShmRing.create(RingLayout(1, 2, 64))
    try:
        with pytest.raises(RingError, match="layout needs"):
            inspect_ring(ring.name, LAYOUT, "broadcast")
    finally:
        ring.close()
        ring.unlink()

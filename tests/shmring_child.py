"""The children of tests/test_shmring.py: ring readers and an outside inspector, at module level in a
module of their own (``spawn`` imports a target by name, and a child should not import a test module).
"""

from __future__ import annotations

import time
from typing import Any

from watchdog.analyzer.rings import describe
from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingLayout, inspect_ring

LAYOUT = RingLayout(n_readers=3, max_chunks=4, max_chunk_bytes=1024)


def read_messages(
    name: str, layout: dict[str, int], rank: int, n: int, out: Any, stop_after: int = -1, gate: Any = None
) -> None:
    """Read ``n`` messages; if ``stop_after`` >= 0, report and wait for ``gate`` after that many (a stuck worker)."""
    ring = ShmRing.attach(name, RingLayout.from_json(layout), reader_rank=rank)
    try:
        got: list[Any] = []
        for i in range(n):
            if i == stop_after:
                out.put((rank, got))
                got = []
                gate.wait(30)
            got.append(ring.dequeue(timeout=30))
            if rank == 1 and i % 7 == 0:
                time.sleep(0.002)  # one slower reader, so the writer really waits on the ring
        out.put((rank, got))
    finally:
        ring.close()


def inspect_from_outside(name: str, layout: dict[str, int], out: Any) -> None:
    state = inspect_ring(name, RingLayout.from_json(layout), "broadcast")
    out.put((state, describe(state)))

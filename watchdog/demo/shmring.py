"""A small, faithful re-implementation of vLLM's shm broadcast ring (``MessageQueue``).

Same byte layout as vLLM's ShmRingBuffer (see ``watchdog.evidence.rings``) and the same flag
protocol: one writer, ``n_readers`` readers, each in its own process. The waiting loops live in
methods named ``acquire_write`` / ``acquire_read`` as in vLLM, so a stack dump of a demo worker
idling on the ring reads like one of a vLLM worker (the analyzer keys on that frame name).

Chunk payload: byte 0 overflow flag (always 0 here: vLLM sends oversized messages over a socket,
the demo refuses them), u32 little-endian length, pickle bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

from watchdog.evidence.rings import RingLayout

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory; SharedMemory(name=x) is SHM_DIR/x

_LEN = struct.Struct("<I")
_HEAD = 1 + _LEN.size  # overflow flag + length

# Waiting: a few quick re-checks keep a busy step loop's latency low; after that sleep with a
# doubling backoff capped at 1 ms, so idle readers cost little CPU on a 2-core machine.
_SPINS = 50
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3

# vLLM fences around flag accesses (a lock acquire/release is a full barrier) so the data write
# is visible before the written flag on weakly ordered CPUs (ARM); x86 would not need it.
_fence_lock = threading.Lock()


def _fence() -> None:
    with _fence_lock:
        pass


def _sleeps() -> Iterator[float]:
    for _ in range(_SPINS):
        yield 0.0
    s = _FIRST_SLEEP_S
    while True:
        yield s
        s = min(2 * s, _MAX_SLEEP_S)


class ShmRing:
    """One side of a ring: the writer (``reader_rank`` None) or reader ``reader_rank``."""

    def __init__(
        self,
        name: str,
        layout: RingLayout,
        reader_rank: int | None,
        *,
        shm: shared_memory.SharedMemory | None = None,
        mm: mmap.mmap | None = None,
    ) -> None:
        if reader_rank is not None and not 0 <= reader_rank < layout.n_readers:
            raise ValueError(f"reader rank {reader_rank} outside a ring of {layout.n_readers} readers")
        self.layout = layout
        self.reader_rank = reader_rank
        self._name = name
        self._shm = shm  # set on the creator only: the one side that may unlink
        self._mm = mm  # set on attached sides
        buf = shm.buf if shm is not None else memoryview(mm) if mm is not None else None
        if buf is None:
            raise ValueError("a ring needs a segment")
        self._buf: memoryview | None = buf
        self._idx = 0  # next chunk to write (writer) or to read (reader)

    @property
    def name(self) -> str:
        return self._name

    @classmethod
    def create(cls, layout: RingLayout, reader_rank: int | None = None) -> ShmRing:
        """A new segment (Python names it ``psm_*``, like vLLM's). The creator writes unless given ``reader_rank``."""
        shm = shared_memory.SharedMemory(create=True, size=layout.total_size)
        assert shm.buf is not None
        # A fresh segment is zero-filled already; zero the flags anyway, as vLLM does.
        meta = layout.metadata_offset(0)
        shm.buf[meta : meta + layout.metadata_size] = bytes(layout.metadata_size)
        return cls(shm.name, layout, reader_rank, shm=shm)

    @classmethod
    def attach(cls, name: str, layout: RingLayout, reader_rank: int | None = None) -> ShmRing:
        """Attach to an existing segment without ever registering it with a resource tracker.

        ``SharedMemory(name=...)`` would register it, and ``resource_tracker.unregister`` does not
        undo that safely: spawned children share their parent's tracker, so the child's unregister
        drops the creator's registration and the creator's own unlink then makes the tracker print
        a KeyError traceback. vLLM patches ``register`` to a no-op instead; mapping the segment's
        file directly is the same thing without the patch.
        """
        with open(Path(SHM_DIR) / name, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size != layout.total_size:
                raise ValueError(f"ring {name}: segment is {size} bytes, layout needs {layout.total_size}")
            mm = mmap.mmap(f.fileno(), layout.total_size)
        return cls(name, layout, reader_rank, mm=mm)

    def _live(self) -> memoryview:
        if self._buf is None:
            raise ValueError(f"ring {self._name} is closed")
        return self._buf

    # ---- writer --------------------------------------------------------------------------

    def acquire_write(self, timeout: float | None) -> int:
        """Wait until the next chunk is free (never written, or read by every reader); its metadata offset."""
        buf, n = self._live(), self.layout.n_readers
        m = self.layout.metadata_offset(self._idx)
        deadline = None if timeout is None else time.monotonic() + timeout
        for pause in _sleeps():
            _fence()
            if not buf[m] or sum(buf[m + 1 : m + 1 + n]) == n:
                return m
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"ring {self._name}: chunk {self._idx} not read by every reader in {timeout} s")
            time.sleep(pause)
        raise AssertionError("unreachable")

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcast ``obj`` to every reader.

        ValueError if it does not fit a chunk (the ring is left as it was); TimeoutError if the ring stays full.
        """
        if self.reader_rank is not None:
            raise RuntimeError(f"ring {self._name}: this side reads (reader {self.reader_rank})")
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if _HEAD + len(data) > self.layout.max_chunk_bytes:
            # Checked before taking a chunk, so a refused message leaves the ring as it was.
            raise ValueError(f"message of {len(data)} bytes does not fit a {self.layout.max_chunk_bytes}-byte chunk")
        m = self.acquire_write(timeout)
        buf, n = self._live(), self.layout.n_readers
        buf[m] = 0  # not written while we fill it
        off = self.layout.data_offset(self._idx)
        buf[off] = 0  # overflow flag
        _LEN.pack_into(buf, off + 1, len(data))
        buf[off + _HEAD : off + _HEAD + len(data)] = data
        # Read flags first, written flag last: the other order would briefly show the chunk as
        # written and already read by some readers, and they would skip it.
        buf[m + 1 : m + 1 + n] = bytes(n)
        _fence()
        buf[m] = 1
        _fence()
        self._idx = (self._idx + 1) % self.layout.max_chunks

    # ---- reader --------------------------------------------------------------------------

    def acquire_read(self, timeout: float | None) -> int:
        """Wait until the next chunk is written and not yet read by this reader; its metadata offset."""
        buf, flag = self._live(), self.layout.metadata_offset(self._idx)
        assert self.reader_rank is not None
        mine = flag + 1 + self.reader_rank
        deadline = None if timeout is None else time.monotonic() + timeout
        for pause in _sleeps():
            _fence()
            if buf[flag] and not buf[mine]:
                return flag
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"ring {self._name}: nothing for reader {self.reader_rank} in {timeout} s")
            time.sleep(pause)
        raise AssertionError("unreachable")

    def dequeue(self, timeout: float | None = None) -> Any:
        """The next message, in the writer's order. TimeoutError if none arrives in time."""
        if self.reader_rank is None:
            raise RuntimeError(f"ring {self._name}: this side writes")
        m = self.acquire_read(timeout)
        buf = self._live()
        off = self.layout.data_offset(self._idx)
        (length,) = _LEN.unpack_from(buf, off + 1)
        if buf[off] != 0 or _HEAD + length > self.layout.max_chunk_bytes:
            raise ValueError(f"ring {self._name}: chunk {self._idx} is damaged (overflow {buf[off]}, length {length})")
        obj = pickle.loads(buf[off + _HEAD : off + _HEAD + length])
        buf[m + 1 + self.reader_rank] = 1
        _fence()
        self._idx = (self._idx + 1) % self.layout.max_chunks
        return obj

    # ---- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap this side. Idempotent; the segment lives on until the creator unlinks it."""
        if self._buf is None:
            return
        if self._shm is not None:
            self._buf = None
            self._shm.close()  # releases its own buf
        elif self._mm is not None:
            self._buf.release()  # an mmap with exported views cannot close
            self._buf = None
            self._mm.close()

    def unlink(self) -> None:
        """Remove the segment (creator only; a no-op elsewhere and when already gone)."""
        if self._shm is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

"""A small, faithful re-implementation of vLLM's shm broadcast ring (MessageQueue).

Same layout as vLLM's ShmRingBuffer (see watchdog.evidence.rings) and the same flag protocol,
with waiting functions named ``acquire_write`` / ``acquire_read`` as in vLLM, so stacks of the
demo read like stacks of vLLM. Chunk payload: byte 0 overflow flag (always 0 here), u32 length,
pickle bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import pickle
import struct
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

from watchdog.evidence.rings import RingLayout

_LEN = struct.Struct("<I")
_HEAD = 1 + _LEN.size


SHM_DIR = "/dev/shm"


class _Mapped:
    """An attached segment: the parts of SharedMemory's interface the ring uses."""

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self._mm = mm
        self.buf: memoryview | None = memoryview(mm)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        self._mm.close()

    def unlink(self) -> None:
        raise RuntimeError("only the creator unlinks a ring")


class ShmRing:
    def __init__(
        self, shm: shared_memory.SharedMemory | _Mapped, layout: RingLayout, reader_rank: int | None, owner: bool
    ) -> None:
        self._shm = shm
        self.layout = layout
        self.reader_rank = reader_rank  # None: this side writes
        self._owner = owner
        self._idx = 0
        self._buf = shm.buf

    @property
    def name(self) -> str:
        return self._shm.name

    @classmethod
    def create(cls, layout: RingLayout, reader_rank: int | None = None) -> ShmRing:
        shm = shared_memory.SharedMemory(create=True, size=layout.total_size)
        assert shm.buf is not None
        shm.buf[: layout.total_size] = bytes(layout.total_size)
        return cls(shm, layout, reader_rank, owner=True)

    @classmethod
    def attach(cls, name: str, layout: RingLayout, reader_rank: int | None = None) -> ShmRing:
        # Map the segment file directly: SharedMemory(name=...) on Python 3.11 registers the
        # segment with the (shared) resource tracker, which then fights the creator's unlink.
        with open(Path(SHM_DIR) / name, "r+b") as f:
            mm = mmap.mmap(f.fileno(), layout.total_size)
        return cls(_Mapped(name, mm), layout, reader_rank, owner=False)

    def _meta(self, chunk: int) -> int:
        return self.layout.metadata_offset(chunk)

    @staticmethod
    def _wait(ready: Any, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        while not ready():
            spins += 1
            if spins > 100:
                time.sleep(min(0.001, 0.00001 * spins))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("no shared memory ring chunk became available")

    def acquire_write(self, timeout: float | None) -> int:
        buf, n = self._buf, self.layout.n_readers
        assert buf is not None
        m = self._meta(self._idx)

        def free() -> bool:
            return not buf[m] or sum(buf[m + 1 : m + 1 + n]) == n

        self._wait(free, timeout)
        return m

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        if self.reader_rank is not None:
            raise RuntimeError("this side of the ring reads")
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if _HEAD + len(data) > self.layout.max_chunk_bytes:
            raise ValueError(f"message of {len(data)} bytes does not fit a {self.layout.max_chunk_bytes}-byte chunk")
        m = self.acquire_write(timeout)
        buf, n = self._buf, self.layout.n_readers
        assert buf is not None
        buf[m] = 0
        off = self.layout.data_offset(self._idx)
        buf[off] = 0
        _LEN.pack_into(buf, off + 1, len(data))
        buf[off + _HEAD : off + _HEAD + len(data)] = data
        buf[m + 1 : m + 1 + n] = bytes(n)
        buf[m] = 1
        self._idx = (self._idx + 1) % self.layout.max_chunks

    def acquire_read(self, timeout: float | None) -> int:
        buf, r = self._buf, self.reader_rank
        assert buf is not None and r is not None
        m = self._meta(self._idx)

        def ready() -> bool:
            return bool(buf[m]) and not buf[m + 1 + r]

        self._wait(ready, timeout)
        return m

    def dequeue(self, timeout: float | None = None) -> Any:
        if self.reader_rank is None:
            raise RuntimeError("this side of the ring writes")
        m = self.acquire_read(timeout)
        buf = self._buf
        assert buf is not None
        off = self.layout.data_offset(self._idx)
        (length,) = _LEN.unpack_from(buf, off + 1)
        obj = pickle.loads(bytes(buf[off + _HEAD : off + _HEAD + length]))
        buf[m + 1 + self.reader_rank] = 1
        self._idx = (self._idx + 1) % self.layout.max_chunks
        return obj

    def close(self) -> None:
        self._buf = None
        self._shm.close()

    def unlink(self) -> None:
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

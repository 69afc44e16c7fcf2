"""vLLM's shm broadcast ring (``ShmRingBuffer``), read from outside and read-only.

Layout, as in vllm/distributed/device_communicators/shm_broadcast.py: ``max_chunks`` data chunks
of ``max_chunk_bytes`` each, then per chunk a metadata block of ``1 + n_readers`` flag bytes:
the written flag, then one read flag per reader.

Protocol: the writer waits until its next chunk is unwritten or read by every reader, clears the
written flag, fills the chunk, zeroes the read flags and only then sets the written flag; a reader
waits until its next chunk is written and not yet read by it, reads it and sets its own flag.
So the flags alone say which reader has not read what: a stuck TP worker shows up as the one
reader whose flags stay 0, without touching (or pausing) any process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from collectors.jsonrecords import JsonRecord
from watchdog.types import RingChunk, RingState


class RingError(Exception):
    """A ring segment that is missing, unreadable or does not match its layout. One-line message."""


@dataclass(frozen=True)
class RingLayout(JsonRecord):
    JSON_NAME: ClassVar[str] = "ring layout"  # extra keys (the engine ledger adds ``name``) are ignored

    n_readers: int
    max_chunks: int
    max_chunk_bytes: int

    def __post_init__(self) -> None:
        if self.n_readers < 1 or self.max_chunks < 1 or self.max_chunk_bytes < 1:
            raise ValueError(f"impossible ring layout {self}")

    @property
    def block_size(self) -> int:
        """Bytes of one chunk's metadata block: the written flag, then one flag per reader."""
        return 1 + self.n_readers

    @property
    def metadata_size(self) -> int:
        return self.max_chunks * self.block_size

    @property
    def total_size(self) -> int:
        return self.max_chunks * self.max_chunk_bytes + self.metadata_size

    def data_offset(self, chunk: int) -> int:
        return self._check(chunk) * self.max_chunk_bytes

    def metadata_offset(self, chunk: int) -> int:
        return self.max_chunks * self.max_chunk_bytes + self._check(chunk) * self.block_size

    def _check(self, chunk: int) -> int:
        if not 0 <= chunk < self.max_chunks:
            raise IndexError(f"chunk {chunk} outside a ring of {self.max_chunks}")
        return chunk


def inspect_ring(name: str, layout: RingLayout, role: str, shm_dir: str = "/dev/shm") -> RingState:
    """The flags of one ring, read from its segment file.

    Opened read-only as a plain file: attaching with ``multiprocessing.shared_memory`` would
    register the segment with a resource tracker (which may unlink it later), and a writable
    mapping could disturb the ring we are only meant to watch.
    """
    if not name or "/" in name or name in (".", ".."):
        raise RingError(f"ring {name!r}: not a shared-memory segment name")
    try:
        with open(Path(shm_dir) / name, "rb") as f:
            size = f.seek(0, 2)
            # Exact match: with a smaller layout we would read data bytes as flags. (vLLM accepts
            # a larger segment for platforms that round up to a page; Linux does not.)
            if size != layout.total_size:
                raise RingError(f"ring {name}: segment is {size} bytes, layout needs {layout.total_size}")
            f.seek(layout.metadata_offset(0))
            meta = f.read(layout.metadata_size)
    except FileNotFoundError:
        raise RingError(f"ring {name}: no such shared-memory segment in {shm_dir}") from None
    except OSError as exc:
        raise RingError(f"ring {name}: cannot read: {exc.strerror or exc}") from None
    if len(meta) != layout.metadata_size:
        raise RingError(f"ring {name}: segment shrank while being read")
    bad = next((b for b in meta if b > 1), None)
    if bad is not None:
        # Flags are only ever 0 or 1; anything else means the layout (reader count, chunk size) is wrong.
        raise RingError(f"ring {name}: flag byte {bad} is not 0/1, layout does not match the segment")
    step = layout.block_size
    chunks = tuple(
        RingChunk(written=meta[i] == 1, read=tuple(b == 1 for b in meta[i + 1 : i + step]))
        for i in range(0, layout.metadata_size, step)
    )
    return RingState(name, role, layout.n_readers, chunks)

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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.evidence import json_field
from watchdog.types import RingChunk, RingState


class RingError(Exception):
    """A ring segment that is missing, unreadable or does not match its layout. One-line message."""


@dataclass(frozen=True)
class RingLayout:
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

    def to_json(self) -> dict[str, int]:
        return {"n_readers": self.n_readers, "max_chunks": self.max_chunks, "max_chunk_bytes": self.max_chunk_bytes}

    @classmethod
    def from_json(cls, d: Any) -> RingLayout:
        """Inverse of ``to_json``; extra keys (the engine ledger adds ``name``) are ignored. ValueError if damaged."""
        return cls(
            json_field(d, "n_readers", int, "ring layout"),
            json_field(d, "max_chunks", int, "ring layout"),
            json_field(d, "max_chunk_bytes", int, "ring layout"),
        )


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


def describe(state: RingState) -> str:
    """One line, e.g. ``broadcast psm_ab12: 3 chunks written; reader 2 has 3 unread, readers 0,1 caught up``."""
    written = sum(1 for c in state.chunks if c.written)
    lagging = [r for r in range(state.n_readers) if state.unread_by(r)]
    caught_up = [str(r) for r in range(state.n_readers) if r not in lagging]
    readers = [f"reader {r} has {state.unread_by(r)} unread" for r in lagging]
    if caught_up:
        readers.append(f"reader{'s' if len(caught_up) > 1 else ''} {','.join(caught_up)} caught up")
    chunks = "chunk" if written == 1 else "chunks"
    return f"{state.role} {state.name}: {written} {chunks} written; {', '.join(readers)}"


@dataclass(frozen=True)
class RingVerdict:
    """What the rings alone say about where a stalled engine <-> workers exchange stopped.

    kind, most telling first:
      ``broadcast_full``   every broadcast chunk is written and ``readers`` have read none of them:
                           the writer (the engine) finds no free block: vLLM's "No available shared
                           memory broadcast block found" on the writer side. Those readers stopped reading.
      ``reader_behind``    ``readers`` have not read the latest broadcast(s) the others read; the ring
                           still has room. Those readers are stuck before taking their request.
      ``reply_unread``     every reader took every broadcast; the response rings of ``ranks`` hold
                           replies the engine has not read (the engine is what stopped).
      ``awaiting_reply``   every reader took every broadcast and no reply is waiting: a worker read its
                           request and has not replied (the hang is inside the step; the engine waits
                           in ``acquire_read``).
      ``idle``             nothing was ever broadcast.
      ``no_broadcast``     the broadcast ring could not be read.
    """

    kind: str
    readers: tuple[int, ...]  # broadcast readers (local worker indexes) that did not read
    ranks: tuple[int, ...]  # response rings (by worker rank) holding unread replies
    summary: str


def classify(broadcast: RingState | None, responses: Mapping[int, RingState]) -> RingVerdict:
    """The ``RingVerdict`` for one deployment's broadcast ring and its response rings (rank -> ring)."""
    unread_replies = tuple(sorted(r for r, st in responses.items() if st.n_readers >= 1 and st.unread_by(0)))
    if broadcast is None:
        return RingVerdict("no_broadcast", (), unread_replies, "the broadcast ring could not be read")
    written = sum(1 for c in broadcast.chunks if c.written)
    if written == 0:
        return RingVerdict("idle", (), unread_replies, f"broadcast {broadcast.name}: nothing broadcast yet")
    unread = {r: broadcast.unread_by(r) for r in range(broadcast.n_readers)}
    behind = tuple(r for r, n in unread.items() if n)
    full = len(broadcast.chunks)
    blocking = tuple(r for r in behind if unread[r] == full)
    if blocking:
        names = ", ".join(map(str, blocking))
        return RingVerdict(
            "broadcast_full",
            blocking,
            unread_replies,
            f"broadcast {broadcast.name}: all {full} chunks written and unread by reader {names}: "
            "the engine has no free block to write (reader stopped reading)",
        )
    if behind:
        parts = ", ".join(f"reader {r} ({unread[r]} unread)" for r in behind)
        return RingVerdict(
            "reader_behind",
            behind,
            unread_replies,
            f"broadcast {broadcast.name}: {parts} did not read what the other readers read",
        )
    if unread_replies:
        ranks = ", ".join(map(str, unread_replies))
        return RingVerdict(
            "reply_unread",
            (),
            unread_replies,
            f"every reader took every broadcast; replies from rank {ranks} wait unread by the engine",
        )
    return RingVerdict(
        "awaiting_reply",
        (),
        (),
        f"broadcast {broadcast.name}: every reader took every broadcast and no reply is waiting: "
        "a worker read its request and has not replied",
    )

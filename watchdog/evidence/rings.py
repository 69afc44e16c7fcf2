"""vLLM's ShmRingBuffer, read from outside and read-only.

Layout (vllm/distributed/device_communicators/shm_broadcast.py): ``max_chunks`` data chunks of
``max_chunk_bytes`` each, then per chunk a metadata block of ``1 + n_readers`` bytes: the
written flag, then one read flag per reader. The writer clears the written flag, writes the
chunk, zeroes the read flags and sets the written flag; each reader sets its own flag when it
has read the chunk. So from the flags alone one sees which reader has not read what.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.types import RingChunk, RingState


class RingError(Exception):
    """A ring segment that is missing or does not match its layout. One-line message."""


@dataclass(frozen=True)
class RingLayout:
    n_readers: int
    max_chunks: int
    max_chunk_bytes: int

    @property
    def metadata_size(self) -> int:
        return self.max_chunks * (1 + self.n_readers)

    @property
    def total_size(self) -> int:
        return self.max_chunks * self.max_chunk_bytes + self.metadata_size

    def data_offset(self, chunk: int) -> int:
        return chunk * self.max_chunk_bytes

    def metadata_offset(self, chunk: int) -> int:
        return self.max_chunks * self.max_chunk_bytes + chunk * (1 + self.n_readers)

    def to_json(self) -> dict[str, int]:
        return {"n_readers": self.n_readers, "max_chunks": self.max_chunks, "max_chunk_bytes": self.max_chunk_bytes}

    @classmethod
    def from_json(cls, d: Any) -> RingLayout:
        if not isinstance(d, dict):
            raise ValueError(f"ring layout must be an object, got {type(d).__name__}")
        layout = cls(int(d["n_readers"]), int(d["max_chunks"]), int(d["max_chunk_bytes"]))
        if layout.n_readers < 1 or layout.max_chunks < 1 or layout.max_chunk_bytes < 1:
            raise ValueError(f"impossible ring layout {layout}")
        return layout


def inspect_ring(name: str, layout: RingLayout, role: str, shm_dir: str = "/dev/shm") -> RingState:
    """The flags of one ring, read from its segment file without attaching to it."""
    path = Path(shm_dir) / name
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            # Python may round a segment up to a page; the layout must fit.
            if size < layout.total_size:
                raise RingError(f"ring {name}: segment is {size} bytes, layout needs {layout.total_size}")
            f.seek(layout.metadata_offset(0))
            meta = f.read(layout.metadata_size)
    except FileNotFoundError:
        raise RingError(f"ring {name}: no such shared-memory segment in {shm_dir}") from None
    except OSError as exc:
        raise RingError(f"ring {name}: cannot read: {exc.strerror or exc}") from None
    step = 1 + layout.n_readers
    chunks = tuple(
        RingChunk(bool(meta[i * step]), tuple(bool(b) for b in meta[i * step + 1 : (i + 1) * step]))
        for i in range(layout.max_chunks)
    )
    return RingState(name, role, layout.n_readers, chunks)


def describe(state: RingState) -> str:
    written = sum(1 for c in state.chunks if c.written)
    lagging = [r for r in range(state.n_readers) if state.unread_by(r)]
    caught_up = [r for r in range(state.n_readers) if r not in lagging]
    parts = [f"{state.role} {state.name}: {written} chunks written"]
    parts += [f"reader {r} has {state.unread_by(r)} unread" for r in lagging]
    if caught_up:
        parts.append(f"readers {','.join(map(str, caught_up))} caught up")
    return "; ".join(parts)

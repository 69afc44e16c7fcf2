"""A consistent copy of a ledger file that a writer may be changing while it is copied. Stdlib only.

Why not a plain copy: the writer publishes a slot by marking its trailer busy, rewriting the slot
(struct.pack_into zero-fills it, then stores field by field, the head seq first) and storing the seq
in the trailer last. One copy of the file reads a slot front to back while that happens, so it can
hold the new head seq, fields still zero and the new trailer seq (the copy overtook the writer in the
middle and fell behind it at the end): both seqs match, the record is torn, and a check made on the
copy accepts it.

What this does instead, per slot and through the shared mapping: read every trailer, copy the file,
read every trailer again. A slot is kept only if its trailer held the same seq before the copy, in
the copy and after it. Before: that seq was stored after the record's fields, so they were complete
before the copy began. After: the next record in that slot starts by marking the trailer busy, so it
had not started when the copy ended. A slot that fails is made unreadable in the copy (its trailer
busy), so every later parse of these bytes (a bundle's included) skips it as torn.

A writer that keeps going during the copy is not damage: the copy keeps the cursor read before the
trailers, so the records written since lie past it (read only where whole), and the slots they
took at the old end of the ring read as overwritten, i.e. lost to the wrap (``reader.scan_ring``),
never as unreadable slots that would make the whole ledger untrusted.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable

from collectors.bounds import LedgerError, parse_header
from collectors.format import BUSY_TRAILER, CURSOR_OFFSET, HEADER_SIZE, SLOT_SIZE, TRAILER_OFFSET

ATTEMPTS = 3  # copies of a ledger whose writer laps most of its ring while it is copied
_SLOT_WORDS = SLOT_SIZE // 8
_TRAILER_WORD = TRAILER_OFFSET // 8


def open_regular(path: str | os.PathLike[str]) -> int:
    """An fd of ``path`` if it is a regular file; LedgerError otherwise. Never blocks (a FIFO would)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read ledger: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LedgerError(f"{path}: cannot read ledger: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def capture(path: str | os.PathLike[str], copy: Callable[[mmap.mmap], bytearray] = bytearray) -> bytes:
    """The ledger at ``path`` as bytes a parser can trust slot by slot (see the module doc).

    Only the ledger's own extent is read: the header's sizes are bounded (``bounds.parse_header``)
    and checked against the file's size before anything is mapped or copied. ``copy`` makes the copy
    of the mapping; the guarantee holds however slowly it runs (``watchdog bench torn`` slows it down
    to widen the race)."""
    where = str(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        header = parse_header(os.pread(fd, HEADER_SIZE, 0), where)
        if size < header.file_size:
            raise LedgerError(f"{where}: ledger is truncated ({size} of {header.file_size} bytes)")
        with mmap.mmap(fd, header.file_size, access=mmap.ACCESS_READ) as mm:
            ring = memoryview(mm)[header.ring_offset : header.file_size]
            words = ring.cast("Q")  # n_slots x 96 bytes: always whole words
            trailers = words[_TRAILER_WORD::_SLOT_WORDS]
            try:
                for _ in range(ATTEMPTS):
                    cursor = mm[CURSOR_OFFSET : CURSOR_OFFSET + 8]  # one 8-byte copy, before the trailers
                    before = trailers.tobytes()
                    image = copy(mm)
                    after = trailers.tobytes()
                    moved = _u64(mm[CURSOR_OFFSET : CURSOR_OFFSET + 8]) - _u64(cursor)
                    if moved <= header.n_slots // 2:
                        break  # else the writer went round most of the ring meanwhile (a preempted copy)
            finally:
                for view in (trailers, words, ring):
                    view.release()  # the mapping cannot close while views of it exist
    except OSError as exc:
        raise LedgerError(f"{where}: cannot read ledger: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    # The copy is the ledger as of the cursor read first: it keeps that cursor, and the slots that the
    # writer has moved on to since (a later seq, or changed while copied) are marked busy, so a reader
    # sees records lost to the wrap at the old end of its window, not damaged slots.
    image[CURSOR_OFFSET : CURSOR_OFFSET + 8] = cursor
    pinned = _u64(cursor)
    # (a record stored but not yet counted by the cursor is left alone: a writer killed there left it whole)
    _invalidate_torn(image, header.ring_offset, header.n_slots, (before, after), range(pinned, pinned + moved))
    return bytes(image)


def _u64(b: bytes) -> int:
    return int.from_bytes(b, "little")


def _invalidate_torn(
    image: bytearray, ring_offset: int, n_slots: int, trailers: tuple[bytes, bytes], span: range
) -> None:
    """Mark busy, in the copy, every slot that changed while copied or holds a record the writer wrote
    after the pinned cursor (a seq in ``span``, in its own slot; a planted seq elsewhere is damage)."""
    before, after = trailers
    view = memoryview(image)[ring_offset : ring_offset + n_slots * SLOT_SIZE]
    copied = view.cast("Q")[_TRAILER_WORD::_SLOT_WORDS].tobytes()
    view.release()
    seqs = memoryview(copied).cast("Q")
    marked = {seq % n_slots for seq in span[-n_slots:] if seqs[seq % n_slots] == seq}
    if not before == copied == after:  # else the usual case: nothing was rewritten during the copy
        marked.update(
            i
            for i in range(n_slots)
            if not before[8 * i : 8 * i + 8] == copied[8 * i : 8 * i + 8] == after[8 * i : 8 * i + 8]
        )
    for i in marked:
        off = ring_offset + i * SLOT_SIZE + TRAILER_OFFSET
        image[off : off + 8] = BUSY_TRAILER

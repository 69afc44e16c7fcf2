"""Tailing a live ledger: the agent's incremental reader, each ``poll()`` only the records new since the last.

The file is mapped read-only once and re-mapped when it is replaced (a restarted worker writes a new
ledger under the same name); the ring is read as ``collectors.reader`` reads it, from the last cursor on.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from collectors.bounds import LedgerError, parse_header
from collectors.capture import open_regular
from collectors.format import Header, Record
from collectors.reader import OpenStep, scan_ring


class LedgerTail:
    """Incremental reader for a live agent: each poll() returns only new records.

    Re-opens the file when it is replaced (a restarted worker writes a new ledger).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._ino = -1
        self.header: Header | None = None
        self.next_seq = 0
        self.lost = 0
        self.skipped = 0
        self.opens = 0  # how many incarnations of the file were mapped (> 1: a restarted writer)
        self._open_step: OpenStep | None = None  # a STEP record whose end may still be stored into it

    def _open(self) -> None:
        st = os.stat(self.path)  # a missing file is the OSError its caller expects (not written yet)
        if self._mm is not None and st.st_ino == self._ino:
            return
        self.close()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device has no end
            raise LedgerError(f"{self.path}: cannot read ledger: not a regular file")
        fd = open_regular(self.path)
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file cannot be mapped
            raise LedgerError(f"{self.path}: too short for a ledger header (empty file)") from None
        finally:
            os.close(fd)
        try:
            header = parse_header(mm, str(self.path))
            if len(mm) < header.file_size:
                raise LedgerError(f"{self.path}: ledger is truncated")
        except LedgerError:
            mm.close()
            raise
        self._mm, self._ino, self.header, self.next_seq, self._open_step = mm, st.st_ino, header, 0, None
        self.opens += 1

    def poll(self) -> list[Record]:
        self._open()
        assert self._mm is not None and self.header is not None
        records, cursor, skipped, lost, self._open_step = scan_ring(
            self._mm, self.header, self.next_seq, self._open_step
        )
        self.next_seq = cursor
        self.skipped += skipped
        self.lost += lost
        return records

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

"""``watchdog bench torn``: a writer process hammers a ledger while this process reads it, both ways.

Every field of every record the writer stores is derived from its step number (``check``), so a
read that hands back a record whose fields disagree with its step has accepted a torn slot. The
writer runs one of two protocols:

* ``new``: ``Recorder`` as it is: the slot's trailer marked busy, the slot packed, the seq stored in
  the trailer last, each seq one aligned 8-byte store;
* ``old``: the protocol before the fix (``OldProtocolRecorder``): the slot packed (``pack_into``
  zero-fills it, then stores the head seq and the fields), then the trailer seq and the cursor,
  each with ``pack_into`` (zero first, then byte by byte); slot 0 of a new file not marked.

The readers, alternated so they see the same load:

* ``copy``: the file copied and each slot's head and trailer seq checked on the copy: how
  ``read_ledger`` worked before ``collectors.capture``;
* ``capture``: ``read_ledger`` as it is now (trailers read through the map before and after the copy).

Each runs with the plain copy (``read_bytes`` / ``bytearray``: a kernel memcpy passes a 96-byte slot in
nanoseconds, so a tear needs the writer to land inside that window: rare, the way the failure was
seen once in 7 test runs) and with a slow copy (``chunk`` bytes at a time, as a reader preempted
mid-copy on a loaded machine makes it): the same race made frequent enough to count.

Only the new writer with the new reader is guaranteed never to accept a torn record: the reader's
check leans on the writer marking the trailer busy before it touches the slot, so the old writer
defeats the new reader too (a copy taken inside ``pack_into`` holds the old head, zeros and the old
trailer, and nothing in the trailer changed around it).
"""

from __future__ import annotations

import mmap
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from struct import Struct
from typing import Any

from collectors.capture import capture
from collectors.format import (
    BUSY_TRAILER,
    CURSOR_OFFSET,
    HEADER_SIZE,
    P_ENGINE_RESULT,
    SLOT_SIZE,
    TRAILER_OFFSET,
    U64,
    Collective,
    CUDAGraphMode,
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    ProcessKind,
    Record,
    RecordKind,
    Role,
    StepBegin,
    StepEnd,
)
from collectors.reader import LedgerError, parse_ledger, read_ledger
from collectors.recorder import Recorder, ledger_name

M32 = 0xFFFFFFFF
_K_STEP = int(RecordKind.STEP)
RANK, WORLD = 0, 1
WRITERS = ("new", "old")  # write protocols of the live writer (see the module doc)


def _key(step: int) -> GraphKey:
    return GraphKey(CUDAGraphMode.FULL, 1 + step % 4096, 1 + step % 512, bool(step & 1))


class OldProtocolRecorder(Recorder):
    """``Recorder`` writing its slots the way it did before the fix (commit a6d9d23), to show what the
    fix buys: no busy mark, so a slot passes through zeros, then its fields, while its trailer still
    holds the old seq; the trailer seq and the cursor stored by ``pack_into``, which zero-fills first.
    Only the order of the stores differs: the bytes of every finished record are the same."""

    def _create(self, kind: ProcessKind, rank: int, world_size: int, instance: str) -> mmap.mmap:
        mm = super()._create(kind, rank, world_size, instance)
        mm[self._ring_off + TRAILER_OFFSET : self._ring_off + SLOT_SIZE] = bytes(8)  # slot 0 left zero
        return mm

    def _put(self, layout: Struct, kind: int, *fields: Any) -> int:
        if not self.enabled:
            return -1
        try:
            mm = self._mm
            assert mm is not None
            seq = next(self._seqs)
            off = self._ring_off + (seq % self._n) * SLOT_SIZE
            layout.pack_into(mm, off, seq, kind, *fields)
            U64.pack_into(mm, off + TRAILER_OFFSET, seq)
            U64.pack_into(mm, CURSOR_OFFSET, seq + 1)
            return seq
        except Exception as exc:
            self._disable(exc)
            return -1


def write_forever(directory: str, n_slots: int, protocol: str = "new") -> None:
    """The writer: per step, an ENGINE_RESULT record and a STEP record whose end is stored into it,
    with ``protocol`` ``new`` (``Recorder``) or ``old`` (``OldProtocolRecorder``)."""
    cls = OldProtocolRecorder if protocol == "old" else Recorder
    rec = cls(directory, kind=ProcessKind.WORKER, rank=RANK, world_size=WORLD, n_slots=n_slots, meta_size=0)
    if not rec.enabled:
        sys.exit(3)
    step = 1
    while True:
        rec.engine_result(
            step, ok=bool(step & 1), running=(step * 37) & M32, waiting=(step * 41) & M32, finished=(step * 43) & M32
        )
        rec.step_begin(
            step,
            _key(step),
            unpadded_tokens=(step * 5) & M32,
            unpadded_reqs=(step * 11) & M32,
            padded_reqs=step & 7,
            placeholders=step & 3,
            launch_manifest=step * 13,
        )
        rec.step_end(step, ok=bool(step & 2))
        step += 1


def check(records: tuple[Record, ...] | list[Record]) -> int:
    """How many of ``records`` are not what the writer stored (torn or misread)."""
    bad = 0
    for r in records:
        if isinstance(r, EngineQueue | Collective | EngineStep):
            bad += 1  # the writer writes no such kind
            continue
        s = r.step
        if isinstance(r, EngineResult):
            good = (r.ok, r.running, r.waiting, r.finished) == (
                bool(s & 1), (s * 37) & M32, (s * 41) & M32, (s * 43) & M32,
            )  # fmt: skip
        elif isinstance(r, StepBegin):
            good = (r.key, r.unpadded_tokens, r.unpadded_reqs, r.padded_reqs, r.placeholders) == (
                _key(s), (s * 5) & M32, (s * 11) & M32, s & 7, s & 3,
            ) and r.launch is not None and r.launch.manifest_hash == (s * 13) & M32  # fmt: skip
        elif isinstance(r, StepEnd):
            good = r.ok == bool(s & 2)
        else:
            good = r.role is Role.MODEL and r.manifest_hash == (s * 13) & M32
        bad += 0 if good and s > 0 and r.mono_ns > 0 else 1
    return bad


def slow_copy(chunk: int) -> Callable[[mmap.mmap], bytearray]:
    def copy(mm: mmap.mmap) -> bytearray:
        out = bytearray()
        for off in range(0, len(mm), chunk):
            out += mm[off : off + chunk]
        return out

    return copy


def _start_writer(directory: Path, n_slots: int, protocol: str) -> subprocess.Popen[bytes]:
    code = f"from watchdog.bench.torn import write_forever; write_forever({str(directory)!r}, {n_slots}, {protocol!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stress(
    *, seconds: float, n_slots: int = 64, chunk: int = 0, writer: str = "new", until: str | None = None
) -> dict[str, Any]:
    """Read a ledger hammered by a ``writer`` (``new`` or ``old`` protocol) both ways, alternating, for
    ``seconds``; count reads, records and misread records. ``chunk`` > 0: copy the file that many bytes
    at a time (see the module doc). ``until`` (``copy`` or ``capture``): stop as soon as that reader
    has accepted a torn record (``seconds`` is then a cap)."""
    if writer not in WRITERS:
        raise ValueError(f"writer protocol {writer!r}: expected one of {', '.join(WRITERS)}")
    counts = {"copy": [0, 0, 0], "capture": [0, 0, 0]}  # reads, records, misread records
    copy: Callable[[mmap.mmap], bytearray] = slow_copy(chunk) if chunk > 0 else bytearray
    with tempfile.TemporaryDirectory(prefix="wd-torn-") as tmp:
        path = Path(tmp) / ledger_name(ProcessKind.WORKER, RANK)
        proc = _start_writer(Path(tmp), n_slots, writer)
        try:
            deadline = time.monotonic() + 30
            while not path.exists() or read_ledger(path).cursor < 4 * n_slots:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ledger writer did not start (exit {proc.poll()})")
                time.sleep(0.01)
            first_cursor = read_ledger(path).cursor
            start = time.monotonic()
            end = start + seconds
            while time.monotonic() < end and not (until and counts[until][2]):
                for way in ("copy", "capture"):
                    try:
                        if way == "capture":
                            led = parse_ledger(capture(path, copy), str(path))
                        elif chunk > 0:
                            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                                led = parse_ledger(bytes(copy(mm)), str(path))
                        else:
                            led = parse_ledger(path.read_bytes(), str(path))
                    except LedgerError:
                        continue
                    c = counts[way]
                    c[0] += 1
                    c[1] += len(led.records)
                    c[2] += check(led.records)
            elapsed = time.monotonic() - start
        finally:
            proc.kill()
            proc.wait(timeout=10)
        written = read_ledger(path).cursor - first_cursor  # read once the writer is gone: a still cursor
    out: dict[str, Any] = {
        "writer": writer,
        "seconds": round(elapsed, 3),
        "n_slots": n_slots,
        "copy_chunk_bytes": chunk or "whole file",
        "records_written": written,
    }
    for way, (reads, records, bad) in counts.items():
        out[f"{way}_reads"] = reads
        out[f"{way}_records"] = records
        out[f"{way}_misread"] = bad
        out[f"{way}_misread_per_million"] = round(bad * 1e6 / records, 1) if records else None
    return out


# ---- interleavings of one write with one read, replayed store by store ----------------------

_SLOTS = 4  # a tiny ring: the replayed record lands in slot 3, over the record 4 seqs older
_SEQ, _STEP = 7, 8  # the replayed record (records 0..6 hold steps 1..7)


def _template() -> bytes:
    with tempfile.TemporaryDirectory(prefix="wd-torn-") as tmp:
        rec = Recorder(tmp, kind=ProcessKind.WORKER, rank=RANK, world_size=WORLD, n_slots=_SLOTS, meta_size=0)
        for s in range(1, _STEP):
            rec.engine_result(
                s, ok=bool(s & 1), running=(s * 37) & M32, waiting=(s * 41) & M32, finished=(s * 43) & M32
            )
        rec.close()
        return rec.path.read_bytes()


def _writer_stores(mm: mmap.mmap, slot: int) -> list[Callable[[], None]]:
    """The stores ``Recorder`` makes to publish an ENGINE_RESULT record, in its order: trailer busy; the
    slot zero-filled (``struct.pack_into`` does that first), then its fields front to back, 8 bytes at a
    time (no field is wider); the trailer seq; the cursor."""
    s = _STEP
    body = P_ENGINE_RESULT.pack(
        _SEQ, RecordKind.ENGINE_RESULT, s, 1 + s, bool(s & 1), (s * 37) & M32, (s * 41) & M32, (s * 43) & M32
    )

    def put(at: int, data: bytes) -> Callable[[], None]:
        return lambda: mm.__setitem__(slice(at, at + len(data)), data)

    stores = [put(slot + TRAILER_OFFSET, BUSY_TRAILER), put(slot, bytes(TRAILER_OFFSET))]
    stores += [put(slot + i, body[i : i + 8]) for i in range(0, len(body), 8)]
    return [*stores, put(slot + TRAILER_OFFSET, U64.pack(_SEQ)), put(CURSOR_OFFSET, U64.pack(_SEQ + 1))]


def _replay(path: Path, template: bytes, way: str, rng: random.Random) -> tuple[int, bool]:
    """One random schedule of the writer's stores among the reader's 8-byte copies (and, for ``capture``,
    its trailer reads before and after the copy). Returns (misread records, the new record accepted)."""
    path.write_bytes(template)
    ring_off = HEADER_SIZE  # meta_size 0
    slot = ring_off + (_SEQ % _SLOTS) * SLOT_SIZE
    chunks = len(template) // 8
    first, last = slot // 8, (slot + SLOT_SIZE) // 8
    # positions: -1 before the trailers are first read, c before copying chunk c, chunks after the copy
    # (before the trailers are read again), chunks + 1 after everything; focused around the slot
    places = [-1, *range(first - 1, last + 1), chunks, chunks + 1]
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as wmm:
        stores = _writer_stores(wmm, slot)
        # one schedule in 8 completes the write before the read: the new record must then be read
        at = [-1] * len(stores) if rng.random() < 0.125 else sorted(rng.choice(places) for _ in stores)
        todo = list(zip(at, stores, strict=True))

        def run_until(pos: int) -> None:
            while todo and todo[0][0] <= pos:
                todo.pop(0)[1]()

        def copy(mm: mmap.mmap) -> bytearray:
            out = bytearray()
            for c in range(chunks):
                run_until(c)
                out += mm[8 * c : 8 * c + 8]
            run_until(chunks)
            return out

        run_until(-1)
        if way == "capture":
            data = capture(path, copy)
        else:
            with open(path, "rb") as r, mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ) as rmm:
                data = bytes(copy(rmm))
        run_until(chunks + 1)
    records = parse_ledger(data, str(path)).records
    return check(records), any(isinstance(r, EngineResult) and r.step == _STEP for r in records)


def interleavings(*, schedules: int, seed: int = 0) -> dict[str, Any]:
    """``schedules`` seeded random interleavings of one record's stores with one read of the ledger file,
    each replayed on a real file for both readers: how many reads accepted a torn record."""
    rng = random.Random(seed)
    template = _template()
    out: dict[str, Any] = {"schedules": schedules, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="wd-torn-") as tmp:
        for way in ("copy", "capture"):
            bad = accepted = 0
            for _ in range(schedules):
                misread, new = _replay(Path(tmp) / "rank000.ledger", template, way, rng)
                bad += misread > 0
                accepted += new
            out[f"{way}_torn_accepted"] = bad
            out[f"{way}_new_record_read"] = accepted
    return out

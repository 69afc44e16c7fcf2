"""Reading ledgers from outside the process that writes them. Stdlib only.

Works while the writer is running, stuck (GIL held or not) or dead (SIGKILL): the file is a
plain shared mapping, so whatever the writer stored is in the page cache.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from collectors.bounds import JsonError, LedgerError, fixed_text, load_json, parse_header
from collectors.capture import capture
from collectors.format import (
    BUSY_TRAILER,
    CURSOR_OFFSET,
    DTYPES,
    HEADER_SIZE,
    META_HEAD,
    META_USED_OFFSET,
    MODES_BY_CODE,
    OPS,
    P_COLLECTIVE,
    P_ENGINE_QUEUE,
    P_ENGINE_RESULT,
    P_ENGINE_STEP,
    P_LAUNCH,
    P_STEP,
    P_STEP_BEGIN,
    P_STEP_BEGIN_LAUNCH,
    P_STEP_END,
    SLOT_HEAD,
    SLOT_SIZE,
    TRAILER_OFFSET,
    U32,
    U64,
    Collective,
    CollectiveOp,
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    Header,
    Launch,
    Ledger,
    Manifest,
    ProcessKind,
    Record,
    RecordKind,
    Role,
    StepBegin,
    StepEnd,
    key_of_code,
)
from collectors.recorder import META_DROPPED_OFFSET, ledger_name

__all__ = ["Ledger", "LedgerError", "ledger_paths", "parse_header", "parse_ledger", "read_ledger", "scan_ring"]


def _key(mode: int, uniform: int, has_lora: int, tokens: int, reqs: int, loras: int) -> GraphKey:
    return GraphKey(
        mode=MODES_BY_CODE[mode],
        num_tokens=tokens,
        num_reqs=None if reqs < 0 else reqs,
        uniform=bool(uniform),
        has_lora=bool(has_lora),
        num_active_loras=loras,
    )


def decode_slot(slot: bytes, expected_seq: int) -> Record | None:
    """The record in one slot, or None if it is torn, stale, foreign or unknown."""
    if len(slot) != SLOT_SIZE:
        return None
    seq, kind = SLOT_HEAD.unpack_from(slot, 0)
    if seq != expected_seq or U64.unpack_from(slot, TRAILER_OFFSET)[0] != expected_seq:
        return None
    try:
        if kind == RecordKind.STEP_BEGIN:
            step, mono, mode, uni, lora, tok, reqs, loras, ut, ur, pad, ph = P_STEP_BEGIN.unpack_from(slot, 0)[2:]
            return StepBegin(seq, step, mono, _key(mode, uni, lora, tok, reqs, loras), ut, ur, pad, ph)
        if kind == RecordKind.STEP_BEGIN_LAUNCH:
            step, mono, mode, uni, lora, tok, reqs, loras, ut, ur, pad, ph, h = P_STEP_BEGIN_LAUNCH.unpack_from(
                slot, 0
            )[2:]
            key = _key(mode, uni, lora, tok, reqs, loras)
            return StepBegin(seq, step, mono, key, ut, ur, pad, ph, Launch(seq, step, mono, Role.MODEL, key, h))
        if kind == RecordKind.STEP:
            step, mono, code, ut, ur, pad, ph, h = P_STEP.unpack_from(slot, 0)[2:10]
            key = key_of_code(code)
            return StepBegin(seq, step, mono, key, ut, ur, pad, ph, Launch(seq, step, mono, Role.MODEL, key, h))
        if kind == RecordKind.STEP_END:
            step, mono, ok = P_STEP_END.unpack_from(slot, 0)[2:]
            return StepEnd(seq, step, mono, bool(ok))
        if kind == RecordKind.LAUNCH:
            step, mono, role, mode, uni, lora, tok, reqs, loras, h = P_LAUNCH.unpack_from(slot, 0)[2:]
            return Launch(seq, step, mono, Role(role), _key(mode, uni, lora, tok, reqs, loras), h)
        if kind == RecordKind.COLLECTIVE:
            step, mono, group, op, dtype, numel, gseq = P_COLLECTIVE.unpack_from(slot, 0)[2:]
            return Collective(seq, step, mono, fixed_text(group), OPS[op], DTYPES[dtype], numel, gseq)
        if kind == RecordKind.ENGINE_STEP:
            return EngineStep(seq, *P_ENGINE_STEP.unpack_from(slot, 0)[2:])
        if kind == RecordKind.ENGINE_RESULT:
            step, mono, ok, running, waiting, finished = P_ENGINE_RESULT.unpack_from(slot, 0)[2:]
            return EngineResult(seq, step, mono, bool(ok), running, waiting, finished)
        if kind == RecordKind.ENGINE_QUEUE:
            return EngineQueue(seq, *P_ENGINE_QUEUE.unpack_from(slot, 0)[2:])
    except (KeyError, IndexError, ValueError):
        return None  # a valid checksum over values this version cannot name
    return None


Hashes = dict[tuple[Role, GraphKey], int]  # the last manifest hash per captured graph


def _parse_meta(
    data: bytes | mmap.mmap, header: Header, where: str
) -> tuple[list[dict[str, Any]], list[str], dict[int, Manifest | str]]:
    """The meta entries, the problems met, and the manifests already built for entries (by id: each
    entry listed is alive as long as the result)."""
    used = min(U64.unpack_from(data, META_USED_OFFSET)[0], header.meta_size)
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    parsed: dict[int, Manifest | str] = {}
    off = HEADER_SIZE
    end = HEADER_SIZE + used
    while off + META_HEAD.size <= end:
        length, crc = META_HEAD.unpack_from(data, off)
        body = bytes(data[off + META_HEAD.size : off + META_HEAD.size + length])
        if length == 0 or len(body) != length or zlib.crc32(body) != crc:
            problems.append(f"{where}: meta area damaged at byte {off}; later entries ignored")
            break
        cached = _ENTRIES.get(body)
        if cached is None:
            try:
                entry: Any = load_json(body, header.meta_size)
            except JsonError as exc:
                entry = JsonError(str(exc))  # never raised, so no traceback keeping this whole file alive
            is_manifest = isinstance(entry, dict) and entry.get("t") == "manifest"
            cached = (entry, _manifest(entry) if is_manifest else None)
            if length <= _CACHED_BYTES:
                _ENTRIES.put(body, cached)
        entry, manifest = cached
        if manifest is not None:
            parsed[id(entry)] = manifest
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            why = entry if isinstance(entry, JsonError) else "not a JSON object"
            problems.append(f"{where}: meta entry at byte {off} is unreadable ({why})")
        off += META_HEAD.size + length
    dropped = U32.unpack_from(data, META_DROPPED_OFFSET)[0]
    if dropped:
        problems.append(f"{where}: meta area full, {dropped} entries (e.g. capture manifests) not recorded")
    return entries, problems, parsed


def _manifest(entry: dict[str, Any]) -> Manifest | str:
    try:
        return Manifest(
            role=Role[str(entry["role"]).upper()],
            key=GraphKey.from_json(entry["key"]),
            collectives=tuple(CollectiveOp.from_json(c) for c in entry["collectives"]),
            hash=int(entry["hash"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        return str(exc)


K = TypeVar("K")
V = TypeVar("V")


class _Recent(Generic[K, V]):
    """The last few parsed meta entries, by their bytes (at most ``max_items``). Meta entries never change
    once written, and every read of a ledger (each poll of the agent, each case of a fuzz) meets the same
    ones again: parsing them is most of what reading a ledger costs. Values are shared: read-only."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


# Bounded in count and, through load_json's size bound per entry and the meta area's, in bytes; only
# entries up to _CACHED_BYTES are kept (a 4 MiB crafted entry is parsed each time, never cached).
_CACHED_BYTES = 64 << 10
_ENTRIES: _Recent[bytes, tuple[Any, Manifest | str | None]] = _Recent(2048)  # entry, its manifest if one


def _manifests(
    entries: list[dict[str, Any]], where: str, problems: list[str], parsed: dict[int, Manifest | str]
) -> tuple[dict[int, Manifest], Hashes]:
    """The manifests by hash, and the last hash recorded for each (role, key)."""
    out: dict[int, Manifest] = {}
    last: Hashes = {}
    for entry in entries:
        if entry.get("t") != "manifest":
            continue
        m = parsed.get(id(entry))
        if m is None:
            m = _manifest(entry)
        if isinstance(m, str):
            problems.append(f"{where}: unreadable capture manifest ({m})")
            continue
        out[m.hash] = m
        last[(m.role, m.key)] = m.hash
    return out, last


def _in_place(slot: bytes, begin: StepBegin, hashes: Hashes) -> list[Record]:
    """What the writer stored into a STEP record after writing it: the drafter's launch (its manifest
    hash is the one the ledger holds for that key: 0 when ``hashes`` is empty) and the step's end."""
    drafter, drafter_mono, end = P_STEP.unpack_from(slot, 0)[10:]
    out: list[Record] = []
    if drafter:
        try:
            key = key_of_code(drafter)
        except KeyError:
            key = None  # a mode this version cannot name: the launch is left out, as a torn record is
        if key is not None:
            h = hashes.get((Role.DRAFTER, key), 0)
            # never before its step's begin (a time word read ahead of its store on a weakly ordered CPU)
            out.append(Launch(begin.seq, begin.step, max(drafter_mono, begin.mono_ns), Role.DRAFTER, key, h))
    if end:
        out.append(StepEnd(begin.seq, begin.step, end >> 1, bool(end & 1)))
    out.sort(key=lambda r: r.mono_ns)
    return out


@dataclass
class OpenStep:
    """The newest STEP record whose end was not yet stored: what a tail has handed out of it."""

    seq: int
    taken: int  # in-place parts already returned


def _overtaken(data: bytes | mmap.mmap, trailer: int) -> bool:
    """Whether a slot's trailer says it is being rewritten (by the writer, or marked so by ``capture``
    because it changed while copied). A later seq is not taken as proof: damage can write one too."""
    return data[trailer : trailer + 8] == BUSY_TRAILER


def scan_ring(
    data: bytes | mmap.mmap,
    header: Header,
    start: int = 0,
    open_step: OpenStep | None = None,
    hashes: Hashes | None = None,
) -> tuple[list[Record], int, int, int, OpenStep | None]:
    """Records with seq >= start still in the ring; also cursor, skipped and lost counts, and the STEP
    record still open. The parts stored into a STEP record later (drafter launch, end) come as their
    own records, placed by time among the records after it; those of ``open_step`` (handed out by an
    earlier poll up to its ``taken``) that have appeared since come first."""
    # One 8-byte copy: struct reads byte by byte and could mix two values of a live cursor.
    cursor = int.from_bytes(data[CURSOR_OFFSET : CURSOR_OFFSET + 8], "little")
    n = header.n_slots
    base = header.ring_offset
    first = max(start, cursor - n if cursor > n else 0)
    lost = max(0, first - start)
    hashes = hashes or {}
    records: list[Record] = []
    later: list[Record] = []  # in-place parts waiting for their place, by time
    skipped = 0

    def slot(seq: int) -> bytes:
        # The writer marks the trailer busy, rewrites the slot, then stores the seq in the
        # trailer. Reading that seq both before and after the copy proves the copy holds one
        # whole record (a single copy of a live slot may mix two records).
        off = base + (seq % n) * SLOT_SIZE
        trailer = off + TRAILER_OFFSET
        want = U64.pack(seq)
        if data[trailer : trailer + 8] != want:
            return b""
        body = bytes(data[off : off + SLOT_SIZE])
        return body if data[trailer : trailer + 8] == want else b""

    def queue_parts(seq: int, body: bytes, begin: StepBegin, taken: int) -> None:
        """Queue the in-place parts of the STEP record ``seq`` past the ``taken`` already handed out;
        it stays the open step until its end is among them."""
        nonlocal open_step
        parts = _in_place(body, begin, hashes)
        later.extend(parts[taken:])
        later.sort(key=lambda r: r.mono_ns)
        open_step = None if any(isinstance(p, StepEnd) for p in parts) else OpenStep(seq, len(parts))

    def take(seq: int) -> bool:
        body = slot(seq)
        rec = decode_slot(body, seq)
        if rec is None:
            return False
        while later and later[0].mono_ns <= rec.mono_ns:
            records.append(later.pop(0))
        records.append(rec)
        if isinstance(rec, StepBegin) and SLOT_HEAD.unpack_from(body, 0)[1] == RecordKind.STEP:
            queue_parts(seq, body, rec, 0)
        return True

    if open_step is not None and open_step.seq < start:
        body = slot(open_step.seq)
        begin = decode_slot(body, open_step.seq)
        if isinstance(begin, StepBegin):
            queue_parts(open_step.seq, body, begin, open_step.taken)
        else:
            open_step = None  # overwritten: its end, if any, is a STEP_END record

    # Slots at the old end of the window that fail because the writer has already begun the next lap
    # in them (trailer busy: the writer's mark, or ``capture``'s for a slot that changed while it was
    # copied) were overwritten, not damaged: lost to the wrap. Only such a run at the
    # very start that a valid record follows counts so; anything else that fails is skipped (damage).
    run, in_prefix = 0, True
    for seq in range(first, cursor):
        if take(seq):
            if in_prefix:
                lost, in_prefix = lost + run, False
            continue
        if in_prefix and _overtaken(data, base + (seq % n) * SLOT_SIZE + TRAILER_OFFSET):
            run += 1
            continue
        if in_prefix:
            skipped, in_prefix = skipped + run, False
        skipped += 1
    if in_prefix:
        skipped += run
    # The cursor can lag: a writer killed between storing a slot and bumping it, or two
    # writer threads finishing out of order. Take valid records past it (from ``start`` if an
    # earlier poll already took some), and never hand back a position before ``start``.
    nxt = max(cursor, first)
    for _ in range(n):
        if not take(nxt):
            break
        nxt += 1
    records.extend(later)
    return records, nxt, skipped, lost, open_step


def _near_steps(records: list[Record]) -> tuple[list[Record], int]:
    """``records`` without those whose step number no writer could have stored beside the others.

    Every step writes at least one record, so the steps in a window of n records span at most about n
    numbers (writers' threads may number theirs apart: hence the floor of the reach). A slot damaged in
    place (its seqs intact, its fields not) can hold any step, and readers of steps loop from the lowest
    to the highest: the span is bounded here, around the median step."""
    steps = sorted(r.step for r in records if not isinstance(r, EngineQueue))
    if not steps:
        return records, 0
    # generous (2^18 steps either side): a few hundred thousand steps cost a reader well under a second
    median, reach = steps[len(steps) // 2], max(2 * len(records) + 16, 1 << 18)
    kept = [r for r in records if isinstance(r, EngineQueue) or abs(r.step - median) <= reach]
    return kept, len(records) - len(kept)


def parse_ledger(data: bytes, path: str = "ledger") -> Ledger:
    header = parse_header(data, path)
    if len(data) < header.file_size:
        raise LedgerError(f"{path}: ledger is truncated ({len(data)} of {header.file_size} bytes)")
    entries, problems, parsed = _parse_meta(data, header, path)
    manifests, last_hashes = _manifests(entries, path, problems, parsed)
    records, cursor, skipped, lost, _ = scan_ring(data, header, hashes=last_hashes)
    if skipped:
        problems.append(f"{path}: {skipped} damaged or torn records skipped")
    records, far = _near_steps(records)
    if far:
        problems.append(f"{path}: {far} records with step numbers far from the rest dropped as damaged")
    return Ledger(path, header, tuple(entries), manifests, tuple(records), cursor, skipped, lost, tuple(problems))


def read_ledger(path: str | os.PathLike[str]) -> Ledger:
    """One ledger file, read safely while its writer runs (``capture``): no torn record is accepted."""
    return parse_ledger(capture(path), str(path))


def ledger_paths(directory: str | os.PathLike[str], ranks: Collection[int] | None = None) -> list[Path]:
    """The ledger files in ``directory``; with ``ranks``, only those ranks' (and the engine's if rank 0 is
    among them: vLLM's engine runs on the node of rank 0)."""
    paths = sorted(p for p in Path(directory).glob("*.ledger") if p.is_file())
    if ranks is None:
        return paths
    return [p for p in paths if _owned(p.name, ranks)]


def _owned(name: str, ranks: Collection[int]) -> bool:
    if name == ledger_name(ProcessKind.ENGINE, 0):
        return 0 in ranks
    return any(name == ledger_name(ProcessKind.WORKER, r) for r in ranks)

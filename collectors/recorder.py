"""The in-process ledger writer. Runs inside vLLM workers and the engine: stdlib only.

Contract with its host process: it never raises. Any failure (unwritable directory, full
disk, a bug) disables the recorder with one logged warning and every later call is a no-op.

Why one module: it is one class, ``Recorder``, whose methods share the mapping, the cursor and the
open STEP slot; split across modules they would only reach into each other's state.

One write path: the plugin calls the same ``step_begin``/``launch``/``collective``/``step_end`` as
everything else. What a graph key or a kind of collective fixes in a record (its code, its packed
fields) is packed once and cached here, found by the key object's identity (hashing a GraphKey runs
Python code; the plugin passes the same object every step). A second set of methods taking
pre-packed arguments saved ~1.4 us of a decode step's writes, about 0.05 % of a real step (README
"Cost"), and went.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from struct import Struct
from typing import Any

from collectors.format import (
    BUSY_TRAILER,
    CURSOR_OFFSET,
    DEFAULT_META_SIZE,
    DEFAULT_SLOTS,
    FORMAT_VERSION,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STATIC,
    MAGIC,
    MAX_META,
    MAX_SLOTS,
    MAX_WORLD,
    META_HEAD,
    META_USED_OFFSET,
    P_ENGINE_QUEUE,
    P_ENGINE_RESULT,
    P_ENGINE_STEP,
    SLOT_SIZE,
    STEP_DRAFTER_MONO_WORD,
    STEP_DRAFTER_WORD,
    STEP_END_WORD,
    TRAILER_OFFSET,
    U32,
    U64,
    CollectiveOp,
    CUDAGraphMode,
    GraphKey,
    ProcessKind,
    RecordKind,
    Role,
    key_code,
    manifest_hash,
)
from collectors.packing import (
    W_COLLECTIVE,
    W_LAUNCH,
    W_STEP,
    W_STEP_BEGIN,
    W_STEP_END,
    pack_collective,
    pack_key,
    pack_launch,
)

log = logging.getLogger("watchdog.ledger")

META_DROPPED_OFFSET = 280  # u32: meta entries that did not fit
_BUSY_U64 = int.from_bytes(BUSY_TRAILER, "little")  # the busy mark as one 8-byte store
_CURSOR_WORD = CURSOR_OFFSET // 8
_SLOT_WORDS = SLOT_SIZE // 8
_TRAILER_WORD = TRAILER_OFFSET // 8
_OK, _NOT_OK = b"\x01", b"\x00"
_mono = time.monotonic_ns
_MAX_KEYS = 4096  # cached keys and collective kinds (a few dozen graph keys, one eager key per size)
# The in-place words of a STEP slot, as literals on the hot path (u64 index from the slot's start).
assert (STEP_DRAFTER_WORD, STEP_DRAFTER_MONO_WORD, STEP_END_WORD) == (8, 9, 10)


# Plain ints: packing an IntEnum member costs an __index__ call on the hot path.
_K_STEP_BEGIN = int(RecordKind.STEP_BEGIN)
_K_STEP_BEGIN_LAUNCH = int(RecordKind.STEP_BEGIN_LAUNCH)
_K_STEP = int(RecordKind.STEP)
_K_STEP_END = int(RecordKind.STEP_END)
_K_LAUNCH = int(RecordKind.LAUNCH)
_K_COLLECTIVE = int(RecordKind.COLLECTIVE)
_K_ENGINE_STEP = int(RecordKind.ENGINE_STEP)
_K_ENGINE_RESULT = int(RecordKind.ENGINE_RESULT)
_K_ENGINE_QUEUE = int(RecordKind.ENGINE_QUEUE)


def ledger_name(kind: ProcessKind, rank: int) -> str:
    return "engine.ledger" if kind is ProcessKind.ENGINE else f"rank{rank:03d}.ledger"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Recorder:
    """Writes one process's ledger. Thread-safe; every method is a no-op once disabled."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        kind: ProcessKind,
        rank: int,
        world_size: int,
        instance: str = "",
        n_slots: int = DEFAULT_SLOTS,
        meta_size: int = DEFAULT_META_SIZE,
    ) -> None:
        self.enabled = False
        self.path = Path(directory) / ledger_name(kind, rank)
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        self._n = n_slots
        if meta_size > 0:
            meta_size = -(-meta_size // 8) * 8  # ring slots 8-byte aligned: their seqs are single stores
        self._ring_off = HEADER_SIZE + meta_size
        self._meta_size = meta_size
        # The header and the ring as arrays of u64: storing one item is one aligned 8-byte store
        # (no slice object, no bytes built): the seqs and the cursor never pass through 0.
        self._head_words: memoryview | None = None
        self._ring_words: memoryview | None = None
        self._meta_used = 0
        self._seqs = itertools.count()
        self._group_seq: dict[str, int] = {}
        # The open STEP record: its step, its seq and the ring word where its slot starts. Its
        # drafter launch and end are stored into that slot while the slot still holds it.
        self._open_step = -1
        self._open_seq = -1
        self._open_word = 0
        self._manifests: dict[tuple[Role, GraphKey], int] = {}  # the last manifest hash per captured graph
        self._keys: dict[int, list[Any]] = {}  # id(GraphKey) -> Recorder._key's entry
        self._idents: dict[tuple[str, str, str], bytes] = {}  # (group, op, dtype) -> packed (COLLECTIVE_FIELDS)
        try:
            self._mm = self._create(kind, rank, world_size, instance)
            self._head_words = memoryview(self._mm)[:HEADER_SIZE].cast("Q")
            self._ring_words = memoryview(self._mm)[self._ring_off :].cast("Q")
            self.enabled = True
        except Exception as exc:  # never raise into the host process
            log.warning("watchdog ledger disabled: cannot create %s: %s", self.path, exc)

    def _create(self, kind: ProcessKind, rank: int, world_size: int, instance: str) -> mmap.mmap:
        if not 0 < self._n <= MAX_SLOTS or not 0 <= self._meta_size <= MAX_META:
            # readers reject a larger ledger as implausible: better no ledger than one nobody reads
            raise ValueError(f"ledger needs 0 < n_slots <= {MAX_SLOTS} and 0 <= meta_size <= {MAX_META}")
        if not 0 < world_size <= MAX_WORLD or not (-1 if kind is ProcessKind.ENGINE else 0) <= rank < world_size:
            raise ValueError(f"ledger needs 0 < world_size <= {MAX_WORLD} and a rank inside it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self._ring_off + self._n * SLOT_SIZE
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        mm: mmap.mmap | None = None
        try:
            with open(tmp, "w+b") as f:
                f.truncate(size)
                # Reserve the blocks now: a store into a sparse mapping on a full disk is SIGBUS.
                os.posix_fallocate(f.fileno(), 0, size)
                mm = mmap.mmap(f.fileno(), size)
            static = HEADER_STATIC.pack(
                MAGIC,
                FORMAT_VERSION,
                int(kind),
                rank,
                world_size,
                os.getpid(),
                self._n,
                SLOT_SIZE,
                self._meta_size,
                time.time_ns(),
                _mono(),
                socket.gethostname().encode()[:64],
                (instance or uuid.uuid4().hex).encode()[:32],
                _boot_id().encode()[:36],
            )
            mm[: len(static)] = static
            U32.pack_into(mm, HEADER_CRC_OFFSET, zlib.crc32(static))
            # Zero-filled slot 0 would read as "seq 0"; mark it so the first record is published by its trailer.
            mm[self._ring_off + TRAILER_OFFSET : self._ring_off + SLOT_SIZE] = BUSY_TRAILER
            os.replace(tmp, self.path)  # readers never see a half-made header
        except BaseException:
            if mm is not None:
                mm.close()
            tmp.unlink(missing_ok=True)  # no half-made file left on a full disk
            raise
        return mm

    def _disable(self, exc: BaseException) -> None:
        if self.enabled:
            self.enabled = False
            log.warning("watchdog ledger %s disabled after an error: %r", self.path, exc)

    # ---- ring ------------------------------------------------------------------------

    def _put(self, layout: Struct, kind: int, *fields: Any) -> int:
        """Write one record; its seq (-1: not written). Hot path."""
        # No lock: next() on an itertools.count is atomic under the GIL, so concurrent writers get
        # distinct slots; the cursor may briefly lag, and readers scan past it while slots stay valid.
        if not self.enabled:
            return -1
        try:
            seq = next(self._seqs)
            i = seq % self._n
            words, mm = self._ring_words, self._mm
            assert words is not None and mm is not None
            trailer = i * _SLOT_WORDS + _TRAILER_WORD
            # Mark the slot busy before rewriting it: pack_into zero-fills, then stores field by
            # field, so without the mark a reader could take a half-written slot whose head and
            # trailer still hold the old seq. Seqs and the cursor are single 8-byte stores.
            words[trailer] = _BUSY_U64
            layout.pack_into(mm, self._ring_off + i * SLOT_SIZE, seq, kind, *fields)
            words[trailer] = seq
            self._head_words[_CURSOR_WORD] = seq + 1  # type: ignore[index]
            return seq
        except Exception as exc:
            self._disable(exc)
            return -1

    def _new_key(self, key: GraphKey) -> list[Any]:
        """Cache [key, key_code, packed key fields, the drafter's last manifest hash for it] of ``key`` by
        the object's identity (the entry holds the object, so its id is not reused meanwhile)."""
        if len(self._keys) >= _MAX_KEYS:
            self._keys.clear()
        entry = self._keys[id(key)] = [key, key_code(key), pack_key(key), self.recorded_manifest(Role.DRAFTER, key)]
        return entry

    def step_begin(
        self,
        step: int,
        key: GraphKey,
        *,
        unpadded_tokens: int,
        unpadded_reqs: int,
        padded_reqs: int = 0,
        placeholders: int = 0,
        launch_manifest: int | None = None,
    ) -> None:
        """A step begins with ``key`` as its graph key. With ``launch_manifest`` (the manifest hash, 0 for
        an eager run) the model's launch is folded into this record: a STEP record (STEP_BEGIN_LAUNCH for
        a key too large for its code) that the step's drafter launch and end are then stored into."""
        if not self.enabled:
            return
        try:
            entry = self._keys.get(id(key))
            if entry is None or entry[0] is not key:
                entry = self._new_key(key)
            _, code, packed, _ = entry
        except Exception as exc:
            self._disable(exc)
            return
        if launch_manifest is not None and code:
            fields = (code, unpadded_tokens, unpadded_reqs, padded_reqs, placeholders, launch_manifest)
            seq = self._put(W_STEP, _K_STEP, step, _mono(), *fields)
            if seq >= 0:
                self._open_step, self._open_seq, self._open_word = step, seq, (seq % self._n) * _SLOT_WORDS
            return
        self._put(
            W_STEP_BEGIN,
            _K_STEP_BEGIN if launch_manifest is None else _K_STEP_BEGIN_LAUNCH,
            step,
            _mono(),
            packed,
            unpadded_tokens,
            unpadded_reqs,
            padded_reqs,
            placeholders,
            launch_manifest or 0,
        )

    def launch(self, step: int, role: Role, key: GraphKey, manifest: int = 0) -> None:
        """A forward pass starts: a graph replay (manifest = its hash) or an eager run (0). The drafter's
        launch is stored into the step's STEP record while that still holds this step and no drafter
        launch, and only when the reader can tell its hash: the key's last recorded manifest (an eager
        run has none); else it is a LAUNCH record of its own."""
        if not self.enabled:
            return
        try:
            if role is Role.DRAFTER and step == self._open_step:
                entry = self._keys.get(id(key))
                if entry is None or entry[0] is not key:
                    entry = self._new_key(key)
                _, code, _, recorded = entry
                words = self._ring_words
                if code and manifest == recorded and (manifest or key.mode is CUDAGraphMode.NONE) and words is not None:
                    b = self._open_word
                    if words[b] == self._open_seq and not words[b + 8]:
                        words[b + 9] = _mono()
                        words[b + 8] = code  # last: a reader that sees the code sees the time
                        return
            packed = pack_launch(role, key, manifest)
        except Exception as exc:
            self._disable(exc)
            return
        self._put(W_LAUNCH, _K_LAUNCH, step, _mono(), packed)

    def recorded_manifest(self, role: Role, key: GraphKey) -> int:
        """The hash of the last manifest recorded for ``role``'s graph of ``key``; 0: none."""
        return self._manifests.get((role, key), 0)

    def collective(self, step: int, group: str, op: str, dtype: str, numel: int) -> None:
        """An eager collective issued by the host, numbered per group."""
        if not self.enabled:
            return
        try:
            ident = self._idents.get((group, op, dtype))
            if ident is None:
                if len(self._idents) >= _MAX_KEYS:
                    self._idents.clear()
                ident = self._idents[(group, op, dtype)] = pack_collective(group, op, dtype)
        except Exception as exc:
            self._disable(exc)
            return
        seq = self._group_seq.get(group, 0)
        self._group_seq[group] = seq + 1
        self._put(W_COLLECTIVE, _K_COLLECTIVE, step, _mono(), ident, numel, seq)

    def step_end(self, step: int, ok: bool = True) -> None:
        """``step`` ended: stored into its STEP record while that is still in its slot, else a STEP_END record."""
        try:
            words = self._ring_words
            if words is not None and step == self._open_step and self.enabled:
                b = self._open_word
                if words[b] == self._open_seq and not words[b + 10]:
                    words[b + 10] = _mono() * 2 + (1 if ok else 0)
                    self._open_step = -1
                    return
        except Exception as exc:
            self._disable(exc)
            return
        self._put(W_STEP_END, _K_STEP_END, step, _mono(), _OK if ok else _NOT_OK)

    def engine_step(
        self,
        step: int,
        *,
        total_tokens: int,
        num_reqs: int,
        num_decode_reqs: int,
        placeholders: int,
        max_query_len: int,
        min_query_len: int,
        running: int,
        waiting: int,
    ) -> None:
        self._put(
            P_ENGINE_STEP,
            _K_ENGINE_STEP,
            step,
            _mono(),
            total_tokens,
            num_reqs,
            num_decode_reqs,
            placeholders,
            max_query_len,
            min_query_len,
            running,
            waiting,
        )

    def engine_result(self, step: int, *, ok: bool, running: int, waiting: int, finished: int) -> None:
        self._put(
            P_ENGINE_RESULT,
            _K_ENGINE_RESULT,
            step,
            _mono(),
            ok,
            running,
            waiting,
            finished,
        )

    def engine_queue(self, *, running: int, waiting: int) -> None:
        self._put(P_ENGINE_QUEUE, _K_ENGINE_QUEUE, _mono(), running, waiting)

    # ---- meta area -------------------------------------------------------------------

    def meta(self, entry: dict[str, Any]) -> None:
        """Append one JSON entry (configuration, rings, ...) to the never-overwritten area."""
        if not self.enabled:
            return
        try:
            data = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode()
            with self._lock:
                mm = self._mm
                assert mm is not None
                need = META_HEAD.size + len(data)
                if self._meta_used + need > self._meta_size:
                    dropped = U32.unpack_from(mm, META_DROPPED_OFFSET)[0]
                    mm[META_DROPPED_OFFSET : META_DROPPED_OFFSET + 4] = U32.pack(dropped + 1)
                    return
                off = HEADER_SIZE + self._meta_used
                mm[off + META_HEAD.size : off + need] = data
                META_HEAD.pack_into(mm, off, len(data), zlib.crc32(data))
                self._meta_used += need
                mm[META_USED_OFFSET : META_USED_OFFSET + 8] = U64.pack(self._meta_used)  # no zero in between
        except Exception as exc:
            self._disable(exc)

    def config(self, **info: Any) -> None:
        self.meta({"t": "config", **info})

    def manifest(self, role: Role, key: GraphKey, collectives: Sequence[CollectiveOp]) -> int:
        """Record the collectives captured into the graph for ``key``; returns the hash."""
        ops = tuple(collectives)
        h = manifest_hash(ops)
        self._manifests[(role, key)] = h
        self._keys.clear()  # their cached drafter manifests may be stale now
        self.meta(
            {
                "t": "manifest",
                "role": role.name.lower(),
                "key": key.to_json(),
                "collectives": [c.to_json() for c in ops],
                "hash": h,
            }
        )
        return h

    def close(self) -> None:
        with self._lock:
            self.enabled = False
            for view in (self._head_words, self._ring_words):
                if view is not None:
                    view.release()  # the mapping cannot close while views of it exist
            self._head_words = self._ring_words = None
            if self._mm is not None:
                try:
                    self._mm.flush()
                    self._mm.close()
                except Exception:  # closing must not raise either
                    pass
                self._mm = None
            self.enabled = False


def open_recorder(
    directory: str | os.PathLike[str] | None,
    *,
    kind: ProcessKind,
    rank: int,
    world_size: int,
    **kwargs: Any,
) -> Recorder | None:
    """A recorder for this process, or None when no ledger directory is configured."""
    if not directory:
        return None
    return Recorder(directory, kind=kind, rank=rank, world_size=world_size, **kwargs)

"""The ledger's on-disk format and the records it holds.

This module is the root of the import graph: stdlib only, no other project import.

A ledger is one fixed-size file per process (each TP worker, and the engine):

    [header: 512 bytes][meta area: append-only JSON entries][ring: n_slots x 96-byte slots]

* The header is written once, except two counters at fixed offsets: ``cursor`` (the
  sequence number of the next ring record) and ``meta_used`` (bytes used in the meta area).
* The meta area holds rare, variable-sized entries (configuration, capture manifests) as
  ``[u32 length][u32 crc32][json]``; it is never overwritten, so manifests survive a ring that
  has wrapped many times.
* A decode step is one STEP record: the step's begin with the model's launch, written before the
  model runs, and two parts stored into that same slot later as aligned 8-byte words that are 0
  until stored: the drafter's launch (its time, then its 64-bit key code) and the step's end (time
  and ok in one word). That is the whole per-step cost: one record plus three word stores. A slot
  the ring has already reused, a second drafter launch or a key too large for its code falls back
  to separate LAUNCH / STEP_END records.
* Each ring slot is ``[u64 record seq][u16 kind][6 pad][72-byte payload][u64 record seq]``.
  The writer stores head and payload in one pack, then the trailing seq. A reader accepts a
  slot only if both seqs equal the one that slot should hold, so a slot torn by a kill or read
  while being overwritten is skipped, never misread. (A checksum would cost as much again as
  the whole write on the hot path; the header and meta entries, written rarely, do carry crc32.)

No prompt text, token ids or request ids are ever recorded: shapes and counts only.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from collectors.jsonrecords import JsonRecord, decode_record, fields_json, json_as

MAGIC: Final = b"TPWDLDG1"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 512
SLOT_SIZE: Final = 96
PAYLOAD_SIZE: Final = SLOT_SIZE - 24
TRAILER_OFFSET: Final = SLOT_SIZE - 8
# A trailer being rewritten (the writer's mark, or a reader's copy's for a slot that changed while
# copied): never a record seq.
BUSY_TRAILER: Final = b"\xff" * 8
DEFAULT_SLOTS: Final = 8192
DEFAULT_META_SIZE: Final = 256 * 1024
# The largest ledger a reader accepts (and a writer makes): 32 x the default ring, 16 x the default
# meta area. A header stating more is damaged or crafted; reading it would cost time and memory out
# of proportion to any real deployment.
MAX_SLOTS: Final = 1 << 18
MAX_META: Final = 4 << 20
MAX_WORLD: Final = 1 << 16

# magic, version, kind, rank, world_size, pid, n_slots, slot_size, meta_size,
# start_wall_ns, start_mono_ns, host, instance, boot_id
HEADER_STATIC: Final = struct.Struct("<8sHHiiiIII4xQQ64s32s36s")
# Dynamic counters live after the static part, each 8-byte aligned.
CURSOR_OFFSET: Final = 256
META_USED_OFFSET: Final = 264
HEADER_CRC_OFFSET: Final = 272  # crc32 of the static header
U64: Final = struct.Struct("<Q")
U32: Final = struct.Struct("<I")

SLOT_HEAD: Final = struct.Struct("<QH6x")  # record seq, kind
META_HEAD: Final = struct.Struct("<II")  # length, crc


class ProcessKind(enum.IntEnum):
    WORKER = 0
    ENGINE = 1


class CUDAGraphMode(enum.StrEnum):
    """Runtime mode of one forward pass, as vLLM's dispatcher returns it."""

    NONE = "NONE"
    PIECEWISE = "PIECEWISE"
    FULL = "FULL"


MODE_CODES: Final = {CUDAGraphMode.NONE: 0, CUDAGraphMode.PIECEWISE: 1, CUDAGraphMode.FULL: 2}
MODES_BY_CODE: Final = {v: k for k, v in MODE_CODES.items()}

OPS: Final = (
    "unknown", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
    "all_to_all", "send", "recv", "barrier", "all_gatherv", "reduce_scatterv",
)  # fmt: skip
# Ops whose size differs between ranks by design (vLLM's all_gatherv / reduce_scatterv take a size per
# rank): compared by op, group and dtype, never by numel.
VARIABLE_SIZE_OPS: Final = frozenset(("all_gatherv", "reduce_scatterv", "all_to_all", "send", "recv"))
DTYPES: Final = (
    "unknown", "float32", "float16", "bfloat16", "int32", "int64", "uint8",
    "float8_e4m3fn", "float64", "int8",
)  # fmt: skip


def code_of(table: tuple[str, ...], name: str) -> int:
    try:
        return table.index(name)
    except ValueError:
        return 0


class Role(enum.IntEnum):
    MODEL = 0
    DRAFTER = 1


class RecordKind(enum.IntEnum):
    STEP_BEGIN = 1
    STEP_BEGIN_LAUNCH = 5  # a step's begin with the model's launch folded in: one record, not two
    STEP = 6  # STEP_BEGIN_LAUNCH with a 64-bit key code; the drafter's launch and the end stored into it
    STEP_END = 2
    LAUNCH = 3
    COLLECTIVE = 4
    ENGINE_STEP = 10
    ENGINE_RESULT = 11
    ENGINE_QUEUE = 12


# Slot layouts, one per record kind: the slot head followed by the payload fields.
# STEP_BEGIN: step, mono, mode, uniform, has_lora, num_tokens, num_reqs(-1=None),
#             active_loras, unpadded_tokens, unpadded_reqs, padded_reqs, placeholders
P_STEP_BEGIN: Final = struct.Struct("<QH6xqqBBBxIiHxxIIII")
# STEP_BEGIN_LAUNCH: the STEP_BEGIN fields, then the model launch's manifest hash (0: eager)
P_STEP_BEGIN_LAUNCH: Final = struct.Struct("<QH6xqqBBBxIiHxxIIIII")
# STEP: step, mono, key code, unpadded_tokens, unpadded_reqs, padded_reqs, placeholders, the model
#       launch's manifest hash; then, stored in place later: the drafter launch's key code (0: none
#       yet) and time, and the end (0: not ended, else mono * 2 + ok)
P_STEP: Final = struct.Struct("<QH6xqqQIIIII4xQQQ")
STEP_DRAFTER_WORD: Final = 8  # u64 index in the slot of the drafter launch's key code
STEP_DRAFTER_MONO_WORD: Final = 9
STEP_END_WORD: Final = 10
assert P_STEP.size == TRAILER_OFFSET and struct.calcsize("<QH6xqqQIIIII4x") == 8 * STEP_DRAFTER_WORD
P_STEP_END: Final = struct.Struct("<QH6xqqB")  # step, mono, ok
# LAUNCH: step, mono, role, mode, uniform, has_lora, num_tokens, num_reqs, active_loras, manifest hash
P_LAUNCH: Final = struct.Struct("<QH6xqqBBBBIiHxxI")
# COLLECTIVE: step, mono, group, op, dtype, numel, group seq
P_COLLECTIVE: Final = struct.Struct("<QH6xqq8sBBxxxxxxQQ")
# ENGINE_STEP: step, mono, total_tokens, num_reqs, num_decode_reqs, placeholders,
#              max_query_len, min_query_len, running, waiting
P_ENGINE_STEP: Final = struct.Struct("<QH6xqqIIIIIIII")
P_ENGINE_RESULT: Final = struct.Struct("<QH6xqqBxxxIII")  # step, mono, ok, running, waiting, finished
P_ENGINE_QUEUE: Final = struct.Struct("<QH6xqII")  # mono, running, waiting

_LAYOUTS = (P_STEP_BEGIN, P_STEP_BEGIN_LAUNCH, P_STEP, P_STEP_END, P_LAUNCH, P_COLLECTIVE)
for _s in (*_LAYOUTS, P_ENGINE_STEP, P_ENGINE_RESULT, P_ENGINE_QUEUE):
    assert _s.size <= TRAILER_OFFSET, _s.format


@dataclass(frozen=True, slots=True)
class GraphKey(JsonRecord):
    """What vLLM's dispatcher chose for one forward pass: (runtime mode, BatchDescriptor)."""

    mode: CUDAGraphMode
    num_tokens: int
    num_reqs: int | None = None
    uniform: bool = False
    has_lora: bool = False
    num_active_loras: int = 0

    def label(self) -> str:
        reqs = "" if self.num_reqs is None else f", reqs={self.num_reqs}"
        tail = " uniform" if self.uniform else ""
        lora = f" lora={self.num_active_loras}" if self.has_lora else ""
        return f"{self.mode.value}(tokens={self.num_tokens}{reqs}{tail}{lora})"


@dataclass(frozen=True, slots=True)
class CollectiveOp:
    """One collective as a graph or the host issues it: shapes only."""

    op: str
    group: str
    dtype: str
    numel: int

    def to_json(self) -> list[object]:  # a list, not an object: manifests hold thousands
        return list(fields_json(self).values())

    @classmethod
    def from_json(cls, data: object) -> CollectiveOp:
        if not isinstance(data, list) or len(data) != 4:
            raise ValueError(f"collective entry must be [op, group, dtype, numel], got {data!r}")
        return decode_record(cls, dict(zip(("op", "group", "dtype", "numel"), data, strict=True)), "collective")


# A key as one u64 (STEP records): bits 0-1 mode, 2 uniform, 3 has_lora, 4-11 active loras,
# 12-31 num_reqs + 1 (0: None), 32-62 num_tokens, 63 always set (a code is never 0).
_CODE_SET: Final = 1 << 63


def key_code(key: GraphKey) -> int:
    """``key`` as the 64-bit code a STEP record holds; 0 if a field is too large for it."""
    reqs = 0 if key.num_reqs is None else key.num_reqs + 1
    if not (0 <= key.num_active_loras <= 0xFF and 0 <= reqs <= 0xFFFFF and 0 <= key.num_tokens <= 0x7FFFFFFF):
        return 0
    return (
        _CODE_SET
        | key.num_tokens << 32
        | reqs << 12
        | key.num_active_loras << 4
        | key.has_lora << 3
        | key.uniform << 2
        | MODE_CODES[key.mode]
    )


def key_of_code(code: int) -> GraphKey:
    """The key a non-zero ``key_code`` stands for (KeyError for a mode code no version names)."""
    reqs = (code >> 12) & 0xFFFFF
    return GraphKey(
        mode=MODES_BY_CODE[code & 3],
        num_tokens=(code >> 32) & 0x7FFFFFFF,
        num_reqs=None if reqs == 0 else reqs - 1,
        uniform=bool(code & 4),
        has_lora=bool(code & 8),
        num_active_loras=(code >> 4) & 0xFF,
    )


def manifest_hash(collectives: tuple[CollectiveOp, ...] | list[CollectiveOp]) -> int:
    text = ";".join(f"{c.op},{c.group},{c.dtype},{c.numel}" for c in collectives)
    return zlib.crc32(text.encode())


# ---- decoded ring records -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepBegin:
    seq: int
    step: int
    mono_ns: int
    key: GraphKey
    unpadded_tokens: int
    unpadded_reqs: int
    padded_reqs: int
    placeholders: int
    launch: Launch | None = None  # the model's launch, when the writer folded it into this record


@dataclass(frozen=True, slots=True)
class StepEnd:
    seq: int
    step: int
    mono_ns: int
    ok: bool


@dataclass(frozen=True, slots=True)
class Launch:
    seq: int
    step: int
    mono_ns: int
    role: Role
    key: GraphKey
    manifest_hash: int


@dataclass(frozen=True, slots=True)
class Collective:
    seq: int
    step: int
    mono_ns: int
    group: str
    op: str
    dtype: str
    numel: int
    group_seq: int


@dataclass(frozen=True, slots=True)
class EngineStep:
    seq: int
    step: int
    mono_ns: int
    total_tokens: int
    num_reqs: int
    num_decode_reqs: int
    placeholders: int
    max_query_len: int
    min_query_len: int
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class EngineResult:
    seq: int
    step: int
    mono_ns: int
    ok: bool
    running: int
    waiting: int
    finished: int


@dataclass(frozen=True, slots=True)
class EngineQueue:
    seq: int
    mono_ns: int
    running: int
    waiting: int


Record = StepBegin | StepEnd | Launch | Collective | EngineStep | EngineResult | EngineQueue


def launches(records: Iterable[Record]) -> list[Launch]:
    """Every launch in ``records``, in order: the LAUNCH records (a reader hands out a drafter launch
    stored into a STEP record as one too) and the model launches folded into step begins (``STEP``,
    ``STEP_BEGIN_LAUNCH``)."""
    out: list[Launch] = []
    for rec in records:
        if isinstance(rec, Launch):
            out.append(rec)
        elif isinstance(rec, StepBegin) and rec.launch is not None:
            out.append(rec.launch)
    return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """The ordered collectives captured into one CUDA graph."""

    role: Role
    key: GraphKey
    collectives: tuple[CollectiveOp, ...]
    hash: int


@dataclass(frozen=True)
class Ledger:
    """A consistent read of one ledger file."""

    path: str
    header: Header
    meta: tuple[dict[str, Any], ...]
    manifests: dict[int, Manifest]
    records: tuple[Record, ...]
    cursor: int
    skipped: int = 0  # slots inside the live window that failed validation (torn or damaged)
    lost: int = 0  # records already overwritten by the ring wrapping
    problems: tuple[str, ...] = field(default=())

    @property
    def rank(self) -> int:
        return self.header.rank

    @property
    def config(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for entry in self.meta:
            if entry.get("t") == "config":
                merged.update({k: v for k, v in entry.items() if k != "t"})
        return merged


def _kind_name(kind: ProcessKind) -> str:
    return kind.name.lower()


@dataclass(frozen=True, slots=True)
class Header(JsonRecord):
    JSON_ORDER: ClassVar[tuple[str, ...]] = (
        "version", "kind", "rank", "world_size", "pid", "n_slots", "host", "instance", "boot_id",
        "start_wall_ns", "start_mono_ns",
    )  # fmt: skip

    version: int
    kind: ProcessKind = field(metadata=json_as(encode=_kind_name))
    rank: int
    world_size: int
    pid: int
    n_slots: int
    slot_size: int = field(metadata=json_as(omit=True))  # layout, not identity
    meta_size: int = field(metadata=json_as(omit=True))
    start_wall_ns: int
    start_mono_ns: int
    host: str
    instance: str
    boot_id: str

    @property
    def ring_offset(self) -> int:
        return HEADER_SIZE + self.meta_size

    @property
    def file_size(self) -> int:
        return self.ring_offset + self.n_slots * self.slot_size

"""What the writer packs: the ledger's record bytes (collectors.format), with the fields that one
graph key, one launch or one kind of collective fixes packed once and copied per record.

The recorder writes through these (and caches what it packs per graph key and kind of collective); the
reader never needs them: what they pack is what ``format``'s ``P_*`` layouts unpack.
"""

from __future__ import annotations

import struct
from typing import Final

from collectors.format import (
    DTYPES,
    MODE_CODES,
    OPS,
    P_COLLECTIVE,
    P_LAUNCH,
    P_STEP_BEGIN,
    P_STEP_BEGIN_LAUNCH,
    P_STEP_END,
    STEP_DRAFTER_WORD,
    TRAILER_OFFSET,
    GraphKey,
    Role,
    code_of,
)

# What the writer packs: the same bytes, but the fields a graph key fixes come pre-packed (once per
# key) and are copied per record. KEY_FIELDS: mode, uniform, has_lora, num_tokens, num_reqs (-1 =
# None), active_loras. LAUNCH_FIELDS: role, then the key's fields, then the manifest hash.
KEY_FIELDS: Final = struct.Struct("<BBBxIiHxx")
LAUNCH_FIELDS: Final = struct.Struct("<BBBBIiHxxI")
# STEP_BEGIN and STEP_BEGIN_LAUNCH: the 5th u32 is the folded launch's manifest hash (unused in STEP_BEGIN)
W_STEP_BEGIN: Final = struct.Struct(f"<QH6xqq{KEY_FIELDS.size}sIIIII")
W_LAUNCH: Final = struct.Struct(f"<QH6xqq{LAUNCH_FIELDS.size}s")
W_STEP_END: Final = struct.Struct("<QH6xqq1s")  # ok as one byte
# STEP's begin part; the pad bytes zero the in-place words of the slot's previous record.
W_STEP: Final = struct.Struct(f"<QH6xqqQIIIII{TRAILER_OFFSET - 8 * STEP_DRAFTER_WORD + 4}x")
assert W_STEP.size == TRAILER_OFFSET
COLLECTIVE_FIELDS: Final = struct.Struct("<8sBB6x")  # group, op, dtype: what names one kind of collective
W_COLLECTIVE: Final = struct.Struct(f"<QH6xqq{COLLECTIVE_FIELDS.size}sQQ")
for _w, _p in ((W_STEP_BEGIN, P_STEP_BEGIN), (W_LAUNCH, P_LAUNCH), (W_STEP_END, P_STEP_END)):
    assert _p.size <= _w.size <= TRAILER_OFFSET, _w.format
assert W_STEP_BEGIN.size == P_STEP_BEGIN_LAUNCH.size and W_COLLECTIVE.size == P_COLLECTIVE.size


def _key_fields(key: GraphKey) -> tuple[int, bool, bool, int, int, int]:
    """mode, uniform, has_lora, num_tokens, num_reqs (-1 = None), active_loras: as records hold a key."""
    reqs = -1 if key.num_reqs is None else key.num_reqs
    return MODE_CODES[key.mode], key.uniform, key.has_lora, key.num_tokens, reqs, key.num_active_loras


def pack_key(key: GraphKey) -> bytes:
    """A key's fields as a STEP_BEGIN record holds them (``W_STEP_BEGIN``)."""
    return KEY_FIELDS.pack(*_key_fields(key))


def pack_launch(role: Role, key: GraphKey, manifest: int) -> bytes:
    """Everything a LAUNCH record holds after its step and time (``W_LAUNCH``)."""
    return LAUNCH_FIELDS.pack(int(role), *_key_fields(key), manifest)


def pack_collective(group: str, op: str, dtype: str) -> bytes:
    """Group, op and dtype as a COLLECTIVE record holds them (``W_COLLECTIVE``); unknown names read "unknown"."""
    return COLLECTIVE_FIELDS.pack(group.encode()[:8], code_of(OPS, op), code_of(DTYPES, dtype))

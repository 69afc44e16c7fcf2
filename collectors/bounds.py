"""What a reader accepts from a file it did not write: limits, the ledger header check, bounded JSON.

Stdlib only. Every count a file states (slots, meta bytes, world size, JSON nesting) is checked
here against a fixed limit and, by the callers, against the bytes the file really holds, before
anything is allocated or looped over: a crafted or damaged file costs time and memory in
proportion to its own size, never to a number written inside it.
"""

from __future__ import annotations

import json
import math
import mmap
import zlib
from typing import Any, Final

from collectors.format import (
    FORMAT_VERSION,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STATIC,
    MAGIC,
    MAX_META,
    MAX_SLOTS,
    MAX_WORLD,
    SLOT_SIZE,
    U32,
    Header,
    ProcessKind,
)

# JSON a watchdog writes is a few levels deep (evidence: stacks -> threads -> frames -> fields);
# anything deeper is not ours. Checked on the parsed value, without recursion.
MAX_JSON_DEPTH: Final = 32


class LedgerError(Exception):
    """A file that is not a ledger, or one too damaged to read. The message is one line."""


class JsonError(ValueError):
    """JSON too large, too deep or not JSON at all. The message is one line."""


def fixed_text(raw: bytes) -> str:
    """A fixed-size, NUL-padded header or record field as text."""
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def parse_header(data: bytes | bytearray | mmap.mmap, where: str = "ledger") -> Header:
    if len(data) < HEADER_SIZE:
        raise LedgerError(f"{where}: too short for a ledger header ({len(data)} bytes)")
    if bytes(data[:8]) != MAGIC:
        raise LedgerError(f"{where}: not a watchdog ledger (bad magic)")
    static = bytes(data[: HEADER_STATIC.size])
    if U32.unpack_from(data, HEADER_CRC_OFFSET)[0] != zlib.crc32(static):
        raise LedgerError(f"{where}: ledger header is damaged (checksum mismatch)")
    (_, version, kind, rank, world, pid, n_slots, slot_size, meta_size, wall, mono, host, inst, boot) = (
        HEADER_STATIC.unpack(static)
    )
    if version != FORMAT_VERSION:
        raise LedgerError(f"{where}: ledger format version {version} is not supported (want {FORMAT_VERSION})")
    if slot_size != SLOT_SIZE or not 0 < n_slots <= MAX_SLOTS or not 0 <= meta_size <= MAX_META:
        raise LedgerError(f"{where}: ledger header has impossible sizes")
    try:
        pkind = ProcessKind(kind)
    except ValueError:
        raise LedgerError(f"{where}: unknown process kind {kind}") from None
    # A checksum proves the header is the one a writer made, not that the writer was sane: world size
    # drives loops over ranks, so it is bounded like any other count (the engine's rank is -1).
    lowest = -1 if pkind is ProcessKind.ENGINE else 0
    if not 0 < world <= MAX_WORLD:
        raise LedgerError(f"{where}: ledger header has an impossible world size {world} (1 to {MAX_WORLD})")
    if not lowest <= rank < world or pid < 0:
        raise LedgerError(f"{where}: ledger header has an impossible rank {rank} of world size {world} (pid {pid})")
    return Header(
        version=version,
        kind=pkind,
        rank=rank,
        world_size=world,
        pid=pid,
        n_slots=n_slots,
        slot_size=slot_size,
        meta_size=meta_size,
        start_wall_ns=wall,
        start_mono_ns=mono,
        host=fixed_text(host),
        instance=fixed_text(inst),
        boot_id=fixed_text(boot),
    )


def json_depth_ok(value: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests no deeper than ``max_depth`` containers. Iterative."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    # 1e999 parses as inf, and int(inf) raises OverflowError wherever a count is taken from it
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} out of range")
    return value


def load_json(data: bytes | str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the input size and nesting bounded and numbers finite; JsonError (one line)
    otherwise.

    Python's decoder recurses per level and raises RecursionError near a thousand; the depth check
    after it keeps the rest of the watchdog (which walks, copies and re-serialises evidence) far
    from that limit too."""
    if len(data) > max_bytes:
        raise JsonError(f"{len(data)} bytes of JSON, more than the {max_bytes} accepted")
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise JsonError("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"not JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    # fewer brackets than the bound cannot nest past it: most entries (capture manifests) skip the walk
    raw = data.encode() if isinstance(data, str) else data
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > max_depth and not json_depth_ok(value, max_depth):
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    return value

"""``watchdog bench fuzz``: mutated ledgers and bundles from the stored scenarios, through the real readers.

Each case takes one scenario bundle (``tests/scenarios/*``), damages one of its files in a seeded way
(bit flips, truncation, splices from another ledger, header fields overwritten with a valid checksum,
slots overwritten with well-framed garbage, meta entries and evidence.json rewritten as other JSON,
deep nesting, huge numbers), writes it into a working copy of the bundle and runs what
``watchdog diagnose`` runs (``load_snapshot``, the analyzer, the report) and what the live agent runs
on a ledger (``LedgerTail.poll``). A case passes when nothing but the readers' one-line errors
(``InputError``, ``LedgerError``) escapes. Reported: cases, failures (first few, with their seeds), the
slowest case and the process's peak RSS above what it held before the first case.

Why one module: just over 400 lines, of two halves that are only read together: the mutators (one
function per kind of damage, picked by ``_mutate``) and the bounded runner that applies them to
copies of the scenarios; split, the runner would be a module that only imports ``_mutate``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import resource
import shutil
import signal
import struct
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectors.format import (
    CURSOR_OFFSET,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STATIC,
    META_HEAD,
    META_USED_OFFSET,
    SLOT_HEAD,
    SLOT_SIZE,
    TRAILER_OFFSET,
    U32,
    U64,
)
from collectors.reader import LedgerError
from collectors.tail import LedgerTail

Bundle = tuple[str, dict[str, bytes], bytes]  # scenario name, ledger name -> bytes, evidence.json
ODD = (0, 1, -1, 2, 7, 255, 65535, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, 2_000_000_000, 1 << 24, 1 << 30)
HEADER_FIELDS = ("version", "kind", "rank", "world", "pid", "n_slots", "slot_size", "meta_size", "wall", "mono")


def load_scenarios(root: Path) -> list[Bundle]:
    out: list[Bundle] = []
    for d in sorted(p for p in root.iterdir() if (p / "evidence.json").is_file()):
        ledgers = {f.name: f.read_bytes() for f in sorted((d / "ledgers").glob("*.ledger"))}
        out.append((d.name, ledgers, (d / "evidence.json").read_bytes()))
    if not out:
        raise ValueError(f"{root}: no scenario bundles (directories with evidence.json)")
    return out


# ---- ledger mutators ---------------------------------------------------------------------------


def _header_field(data: bytes, rng: random.Random) -> bytes:
    fields = list(HEADER_STATIC.unpack_from(data)) if len(data) >= HEADER_SIZE else None
    if fields is None:
        return data
    i = 1 + rng.randrange(len(HEADER_FIELDS))  # field 0 is the magic
    for _ in range(10):
        fields[i] = rng.choice(ODD) if rng.random() < 0.7 else rng.getrandbits(64) - (1 << 63)
        try:
            static = HEADER_STATIC.pack(*fields)
            break
        except struct.error:
            continue
    else:
        return data
    out = bytearray(data)
    out[: len(static)] = static
    if rng.random() < 0.9:  # a valid checksum: the header check must stand on the values, not the crc
        U32.pack_into(out, HEADER_CRC_OFFSET, zlib.crc32(static))
    return bytes(out)


def _bitflips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 8, 64, 2000))):
        i = rng.randrange(len(out)) if rng.random() < 0.5 else rng.randrange(HEADER_SIZE, len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.choice((0, 7, HEADER_SIZE - 1, HEADER_SIZE, rng.randrange(len(data) + 1), len(data) - 1))]


def _splice(data: bytes, other: bytes, rng: random.Random) -> bytes:
    a, b = sorted(rng.randrange(len(other) + 1) for _ in range(2))
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:at] + other[a:b] + data[at + (b - a) :]  # overwrite in place
    return data[:at] + other[a:b] + data[at:]  # insert: everything after shifts


def _ring_offset(data: bytes) -> tuple[int, int] | None:
    if len(data) < HEADER_SIZE:
        return None
    n_slots, _, meta = struct.unpack_from("<III", data, 8 + 2 + 2 + 4 + 4 + 4)
    return HEADER_SIZE + meta, n_slots


def _slot_garbage(data: bytes, rng: random.Random) -> bytes:
    """A slot rewritten with random fields but the seqs it should hold: a well-framed record of nonsense."""
    where = _ring_offset(data)
    if where is None or where[1] == 0:
        return data
    ring, n = where
    cursor = U64.unpack_from(data, CURSOR_OFFSET)[0]
    out = bytearray(data)
    for _ in range(rng.choice((1, 4, 32))):
        seq = max(0, cursor - 1 - rng.randrange(min(n, cursor) or 1))
        off = ring + (seq % n) * SLOT_SIZE
        if off + SLOT_SIZE > len(out):
            break
        body = bytearray(rng.randbytes(SLOT_SIZE))
        SLOT_HEAD.pack_into(body, 0, seq, rng.choice((1, 2, 3, 4, 5, 6, 10, 11, 12, rng.randrange(65536))))
        U64.pack_into(body, TRAILER_OFFSET, seq)
        out[off : off + SLOT_SIZE] = body
    return bytes(out)


def _counters(data: bytes, rng: random.Random) -> bytes:
    if len(data) < HEADER_SIZE:
        return data
    out = bytearray(data)
    U64.pack_into(out, rng.choice((CURSOR_OFFSET, META_USED_OFFSET)), rng.choice(ODD) & (2**64 - 1))
    return bytes(out)


def _meta_entry(data: bytes, rng: random.Random) -> bytes:
    """The first meta entry replaced by other JSON (mutated, deep, huge), with a valid length and crc."""
    if len(data) < HEADER_SIZE + META_HEAD.size:
        return data
    length, _ = META_HEAD.unpack_from(data, HEADER_SIZE)
    try:
        entry = json.loads(data[HEADER_SIZE + META_HEAD.size : HEADER_SIZE + META_HEAD.size + length])
    except ValueError:
        entry = {}
    body = _json_bytes(entry, rng)
    out = bytearray(data)
    room = U64.unpack_from(out, META_USED_OFFSET)[0]
    end = HEADER_SIZE + META_HEAD.size + len(body)
    if end > len(out):
        return data
    out[HEADER_SIZE + META_HEAD.size : end] = body
    META_HEAD.pack_into(out, HEADER_SIZE, len(body), zlib.crc32(body))
    U64.pack_into(out, META_USED_OFFSET, max(room, META_HEAD.size + len(body)))
    return bytes(out)


# ---- JSON mutators -----------------------------------------------------------------------------


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        ("abc", "", -1, 0, 2**70, 1.5, 1e308, float("inf"), None, True, [], {}, [1, 2], {"a": 1}, [[[]]], "1e999")
    )


def _nodes(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in ``value``, iteratively."""
    out: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        v = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, child in items:
            out.append((v, k))
            stack.append(child)
    return out


def _json_bytes(value: Any, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        depth = rng.choice((50, 1000, 100_000))
        return (
            ("[" * depth + "]" * depth).encode()
            if rng.random() < 0.5
            else ('{"a":' * depth + "1" + "}" * depth).encode()
        )
    nodes = _nodes(value)
    for _ in range(rng.choice((1, 1, 3, 20))):
        if not nodes:
            break
        parent, key = rng.choice(nodes)
        if rng.random() < 0.2 and isinstance(parent, dict):
            parent.pop(key, None)
        else:
            parent[key] = _odd_value(rng)
        nodes = _nodes(value)
    text = json.dumps(value, allow_nan=True).encode()
    if roll > 0.9:  # text-level damage too: cut, or a byte changed
        i = rng.randrange(len(text) + 1)
        text = text[:i] if rng.random() < 0.5 else text[:i] + bytes([rng.randrange(256)]) + text[i + 1 :]
    return text


# ---- running cases ----------------------------------------------------------------------------


def _mutate(bundle: Bundle, others: list[bytes], rng: random.Random) -> tuple[str, bytes, str]:
    """(file name in the bundle, its new bytes, what was done)."""
    _, ledgers, evidence = bundle
    if rng.random() < 0.35:
        return "evidence.json", _json_bytes(json.loads(evidence), rng), "evidence json"
    target = rng.choice(sorted(ledgers))
    data = ledgers[target]
    ops: list[tuple[str, Callable[[], bytes]]] = [
        ("header field", lambda: _header_field(data, rng)),
        ("bit flips", lambda: _bitflips(data, rng)),
        ("truncate", lambda: _truncate(data, rng)),
        ("splice", lambda: _splice(data, rng.choice(others), rng)),
        ("slot garbage", lambda: _slot_garbage(data, rng)),
        ("counters", lambda: _counters(data, rng)),
        ("meta entry", lambda: _meta_entry(data, rng)),
        ("random bytes", lambda: rng.randbytes(rng.choice((0, 100, len(data))))),
    ]
    what, op = rng.choice(ops)
    return f"ledgers/{target}", op(), what


def _run_case(work: Path, rel: str, alone: bool = True) -> list[str]:
    """What each reading of the damaged bundle ended in: "rejected" (a one-line error) or the verdict."""
    from watchdog.analyzer import diagnose
    from watchdog.bundle import load_snapshot
    from watchdog.errors import InputError
    from watchdog.report import render

    targets = [work]
    if rel.startswith("ledgers/"):
        if alone:
            targets.append(work / rel)  # the ledger alone, as `watchdog diagnose FILE.ledger` reads it
        tail = LedgerTail(work / rel)
        try:
            tail.poll()
            tail.poll()
        except LedgerError:
            pass
        finally:
            tail.close()
    outcomes = []
    for target in targets:
        try:
            diagnosis = diagnose(load_snapshot(target))
        except (InputError, LedgerError) as exc:
            if "\n" in str(exc):
                raise AssertionError(f"an error of more than one line: {str(exc)[:200]!r}") from None
            outcomes.append("rejected")
            continue
        json.dumps(diagnosis.to_json())
        render(diagnosis)
        outcomes.append(diagnosis.verdict.value)
    return outcomes


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class CaseTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout(f"case ran past {CASE_LIMIT_S} s")


# Hard limits per case: a regression (a loop over a count read from a file) must end as a counted failure,
# not take the machine down. The figures reported are far below them.
CASE_LIMIT_S = 10
ADDRESS_SPACE_LIMIT = 4 << 30


def fuzz_range(root: str, first: int, count: int, seed: int) -> dict[str, Any]:
    """Cases ``first`` .. ``first + count - 1`` of the run seeded ``seed``, in this process."""
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, old_limit[1]))
    try:
        return _fuzz_range(root, first, count, seed)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)


def _fuzz_range(root: str, first: int, count: int, seed: int) -> dict[str, Any]:
    scenarios = load_scenarios(Path(root))
    others = [d for _, ledgers, _ in scenarios for d in ledgers.values()]
    failures: list[str] = []
    kinds: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    slowest = (0.0, -1, "")
    with tempfile.TemporaryDirectory(prefix="wd-fuzz-") as tmp:
        works = {}
        for name, _, _ in scenarios:
            works[name] = Path(tmp) / name
            shutil.copytree(Path(root) / name, works[name])
        _run_case(works[scenarios[0][0]], "evidence.json")  # warm: imports and caches before the RSS baseline
        base_rss = _rss_kb()
        for case in range(first, first + count):
            rng = random.Random(seed * 1_000_003 + case)
            bundle = rng.choice(scenarios)
            rel, data, what = _mutate(bundle, others, rng)
            work = works[bundle[0]]
            original = (work / rel).read_bytes()
            (work / rel).write_bytes(data)
            t0 = time.perf_counter()
            signal.alarm(CASE_LIMIT_S)
            try:
                for outcome in _run_case(work, rel, alone=case % 4 == 0):
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            except Exception as exc:  # what the fuzz is for: anything but the one-line errors is a failure
                if len(failures) < 20:
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    failures.append(
                        f"case {case} ({bundle[0]} {rel}: {what}): {type(exc).__name__}: {str(exc)[:200]}"
                        f" at {Path(where.filename).name}:{where.lineno}"
                    )
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
            signal.alarm(0)
            dt = time.perf_counter() - t0
            if dt > slowest[0]:
                slowest = (dt, case, f"{bundle[0]} {rel}: {what}")
            (work / rel).write_bytes(original)
    return {
        "cases": count,
        "failed": sum(kinds.values()),
        "failures_by_type": kinds,
        "outcomes": outcomes,
        "failures": failures,
        "max_case_s": round(slowest[0], 4),
        "slowest_case": f"case {slowest[1]} ({slowest[2]})",
        "peak_rss_mb": round(_rss_kb() / 1024, 1),
        "peak_rss_above_baseline_mb": round((_rss_kb() - base_rss) / 1024, 1),
    }


def _job(args: tuple[str, int, int, int]) -> dict[str, Any]:
    return fuzz_range(*args)


def bench_fuzz(*, root: str, cases: int, seed: int, jobs: int, first: int = 0) -> dict[str, Any]:
    """Cases ``first`` .. ``first + cases - 1`` of the run seeded ``seed``, shared by ``jobs`` processes."""
    t0 = time.perf_counter()
    jobs = max(1, min(jobs, cases))
    per = -(-cases // jobs)
    parts = [(root, first + i * per, min(per, cases - i * per), seed) for i in range(jobs) if cases - i * per > 0]
    if jobs == 1:
        results = [fuzz_range(*parts[0])]
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_job, parts)
    kinds: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r["failures_by_type"].items():
            kinds[k] = kinds.get(k, 0) + v
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    return {
        "cases": sum(r["cases"] for r in results),
        "first_case": first,
        "seed": seed,
        "jobs": jobs,
        "failed": sum(r["failed"] for r in results),
        "failures_by_type": kinds,
        "outcomes": outcomes,
        "failures": [f for r in results for f in r["failures"]][:20],
        "max_case_s": max(r["max_case_s"] for r in results),
        "slowest_case": max(results, key=lambda r: r["max_case_s"])["slowest_case"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "peak_rss_above_baseline_mb": max(r["peak_rss_above_baseline_mb"] for r in results),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def ledger_cases(root: str, count: int, seed: int) -> dict[str, Any]:
    """Ledger mutations only, parsed in memory (``parse_ledger``): many cases a second, for the tests.
    Returns cases, failures (anything but a one-line LedgerError) and how many parsed."""
    from collectors.reader import parse_ledger

    scenarios = load_scenarios(Path(root))
    others = [d for _, ledgers, _ in scenarios for d in ledgers.values()]
    failures: list[str] = []
    parsed = 0
    for case in range(count):
        rng = random.Random(seed * 1_000_003 + case)
        _, ledgers, _ = rng.choice(scenarios)
        data = rng.choice(others + list(ledgers.values()))
        what, op = rng.choice(
            (
                ("header field", _header_field),
                ("bit flips", _bitflips),
                ("truncate", _truncate),
                ("slot garbage", _slot_garbage),
                ("counters", _counters),
                ("meta entry", _meta_entry),
            )
        )
        try:
            led = parse_ledger(op(data, rng), "fuzzed.ledger")
            parsed += 1
            steps = [r.step for r in led.records if hasattr(r, "step")]  # an engine queue record has none
            if steps and max(steps) - min(steps) > 4 * (1 << 18):
                failures.append(f"case {case} ({what}): steps span {max(steps) - min(steps)}")
        except LedgerError as exc:
            if "\n" in str(exc) or "fuzzed.ledger" not in str(exc):
                failures.append(f"case {case} ({what}): error not one line naming the file: {exc!r}")
        except Exception as exc:
            failures.append(f"case {case} ({what}): {type(exc).__name__}: {str(exc)[:200]}")
    return {"cases": count, "parsed": parsed, "failures": failures}

"""Readers that survive anything: the reproducers of issue 15 (crafted counts, deep JSON, wrong types,
devices and FIFOs, torn records), a short fuzz over the stored scenarios, and the torn-read protocol.

Real parts only: real ledger files written by the real Recorder, real bundles (the golden scenarios),
the real CLI, a real writer process, real FIFOs and /dev/zero.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collectors.bounds import MAX_JSON_DEPTH, JsonError, load_json
from collectors.format import (
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STATIC,
    MAX_SLOTS,
    META_HEAD,
    META_USED_OFFSET,
    U32,
    U64,
    CollectiveOp,
    CUDAGraphMode,
    GraphKey,
    ProcessKind,
    Role,
)
from collectors.reader import LedgerError, parse_ledger, read_ledger
from collectors.recorder import Recorder
from collectors.tail import LedgerTail
from watchdog.bench.fuzz import fuzz_range, ledger_cases
from watchdog.bench.torn import interleavings, stress
from watchdog.bundle import load_snapshot
from watchdog.cli import main
from watchdog.snapshot import read_ledger_dir

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
BUNDLE = SCENARIOS / "graph-key-divergence"


def reheader(data: bytes, **changes: Any) -> bytes:
    """``data`` with static header fields replaced and a correct checksum: a crafted, not a damaged, header."""
    names = ["magic", "version", "kind", "rank", "world", "pid", "n_slots", "slot_size", "meta_size",
             "wall", "mono", "host", "instance", "boot"]  # fmt: skip
    fields = dict(zip(names, HEADER_STATIC.unpack_from(data), strict=True))
    fields.update(changes)
    static = HEADER_STATIC.pack(*fields.values())
    out = bytearray(data)
    out[: len(static)] = static
    U32.pack_into(out, HEADER_CRC_OFFSET, zlib.crc32(static))
    return bytes(out)


def small_ledger(directory: Path, rank: int = 0, world: int = 2) -> Path:
    rec = Recorder(directory, kind=ProcessKind.WORKER, rank=rank, world_size=world, n_slots=64, meta_size=4096)
    rec.config(model="m", tp=world)
    rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8, 8), [CollectiveOp("all_reduce", "tp", "float32", 8)])
    for step in range(10):
        rec.step_begin(step, GraphKey(CUDAGraphMode.FULL, 8, 8), unpadded_tokens=8, unpadded_reqs=8, launch_manifest=0)
        rec.step_end(step)
    rec.close()
    return rec.path


def one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("watchdog: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def copy_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dst)
    return dst


# ---- crafted counts ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"world": 2_000_000_000}, "impossible world size 2000000000"),
        ({"world": 0}, "impossible world size 0"),
        ({"rank": 5}, "impossible rank"),  # rank 5 of world 2
        ({"rank": -3}, "impossible rank"),
        ({"pid": -1}, "impossible rank"),
        ({"n_slots": MAX_SLOTS + 1}, "impossible sizes"),
        ({"n_slots": 2**32 - 1}, "impossible sizes"),
        ({"meta_size": 2**32 - 1}, "impossible sizes"),
    ],
)
def test_crafted_header_counts_are_rejected_fast_by_every_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, int], words: str
) -> None:
    good = small_ledger(tmp_path / "src")
    path = tmp_path / "rank001.ledger"
    path.write_bytes(reheader(good.read_bytes(), **changes))
    t0 = time.monotonic()
    with pytest.raises(LedgerError, match=words):
        read_ledger(path)
    with pytest.raises(LedgerError, match=words):
        parse_ledger(path.read_bytes(), str(path))
    tail = LedgerTail(path)  # the live agent's reader
    try:
        with pytest.raises(LedgerError, match=words):
            tail.poll()
    finally:
        tail.close()
    assert main(["diagnose", str(path)]) == 1
    one_error_line(capsys, str(path), words)
    # in a deployment's directory it is one missing rank, not a crash or a loop over its world size
    shutil.copy(good, tmp_path / "rank000.ledger")
    ledgers = read_ledger_dir(tmp_path)
    assert list(ledgers.ranks) == [0] and any(words in m and "rank001" in m for m in ledgers.missing)
    assert time.monotonic() - t0 < 20  # generous for a loaded machine; the bug took minutes and 6 GB


def test_a_huge_but_valid_world_size_gives_one_missing_line(tmp_path: Path) -> None:
    path = small_ledger(tmp_path, rank=0, world=60_000)
    ledgers = read_ledger_dir(tmp_path)
    absent = [m for m in ledgers.missing if "no ledger" in m and "rank" in m]
    assert len(absent) == 1 and "59999 of 60000 ranks" in absent[0], absent
    assert path.exists()


def test_the_recorder_refuses_a_ledger_readers_would_reject(tmp_path: Path) -> None:
    for kwargs in ({"n_slots": MAX_SLOTS + 1}, {"world_size": 2_000_000_000}, {"rank": 3}):
        args: dict[str, Any] = {"rank": 0, "world_size": 2, **kwargs}
        rec = Recorder(tmp_path, kind=ProcessKind.WORKER, **args)
        assert not rec.enabled and not rec.path.exists()
        rec.step_end(1)  # still never raises


# ---- deep and odd JSON ---------------------------------------------------------------------------


def put_meta_entry(path: Path, body: bytes) -> None:
    """Replace the ledger's meta area with one entry ``body`` (a valid length and crc)."""
    data = bytearray(path.read_bytes())
    META_HEAD.pack_into(data, HEADER_SIZE, len(body), zlib.crc32(body))
    data[HEADER_SIZE + META_HEAD.size : HEADER_SIZE + META_HEAD.size + len(body)] = body
    U64.pack_into(data, META_USED_OFFSET, META_HEAD.size + len(body))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 1500 + b"]" * 1500, "nested"),  # RecursionError in json.loads before
        (b'{"a":' * 60 + b"1" + b"}" * 60, f"deeper than {MAX_JSON_DEPTH}"),
        (b'{"t":"config","tp":1e999}', "out of range"),
        (b'{"t":"config","tp":NaN}', "NaN"),
        (b"[1,2]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_a_damaged_meta_entry_is_a_problem_line_not_a_crash(tmp_path: Path, body: bytes, words: str) -> None:
    path = small_ledger(tmp_path)
    put_meta_entry(path, body)
    led = read_ledger(path)
    assert led.meta == () and len(led.records) == 20
    assert any("meta entry" in p and words in p for p in led.problems), led.problems


def test_load_json_bounds() -> None:
    assert load_json(b'{"a": [1, 2.5, {"b": null}]}', 100) == {"a": [1, 2.5, {"b": None}]}
    for data, words in [(b"[]" * 60, "more than"), (b"[" * 100_000, "nested"), (b"-Infinity", "allows")]:
        with pytest.raises(JsonError, match=words):
            load_json(data, 100 if words == "more than" else 1 << 20)


def mutate_evidence(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        ev = json.loads((bundle / "evidence.json").read_text())
        fn(ev)
        (bundle / "evidence.json").write_text(json.dumps(ev))

    return apply


def set_text(text: str) -> Callable[[Path], None]:
    return lambda bundle: (bundle / "evidence.json").write_text(text)


def first_ring(ev: dict[str, Any]) -> dict[str, Any]:
    ring: dict[str, Any] = ev["rings"][0]
    return ring


EVIDENCE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "stacks is a string": (mutate_evidence(lambda ev: ev.update(stacks="abc")), "stacks: expected dict"),
    "procs is a list": (mutate_evidence(lambda ev: ev.update(procs=[1, 2])), "procs: expected dict"),
    "a ring's chunks is a string": (
        mutate_evidence(lambda ev: first_ring(ev).update(chunks="abc")),
        "ring.chunks: expected list",
    ),
    "a ring chunk too short": (
        mutate_evidence(lambda ev: first_ring(ev).update(chunks=[[1]])),
        "ring.chunks[0]: expected",
    ),
    "a ring with a huge reader count": (
        mutate_evidence(lambda ev: first_ring(ev).update(n_readers=2_000_000_000)),
        "out of range",
    ),
    "rings is an object": (mutate_evidence(lambda ev: ev.update(rings={"a": 1})), "rings: expected list"),
    "stall is a string": (mutate_evidence(lambda ev: ev.update(stall="x")), "stall: expected an object"),
    "stall lacks a field": (mutate_evidence(lambda ev: ev.update(stall={"kind": "open_step"})), "missing 'step'"),
    "missing is a number": (mutate_evidence(lambda ev: ev.update(missing=5)), "missing: expected list"),
    "a stack with a string pid": (
        mutate_evidence(lambda ev: ev["stacks"].update({k: {**v, "pid": "x"} for k, v in ev["stacks"].items()})),
        "stack.pid",
    ),
    "taken_mono_ns a float": (mutate_evidence(lambda ev: ev.update(taken_mono_ns=1.5)), "taken_mono_ns"),
    "deeply nested": (set_text("[" * 100_000 + "]" * 100_000), "nested"),
    "nested deeper than evidence is": (set_text('{"a":' * 100 + "1" + "}" * 100), "deeper than"),
    "an infinite number": (set_text('{"schema": 1e999}'), "out of range"),
    "not JSON": (set_text("{"), "not JSON"),
    "not an object": (set_text("[]"), "not watchdog evidence"),
    "too large": (set_text(" " * (16 << 20) + "{}"), "more than"),
}


@pytest.mark.parametrize("case", sorted(EVIDENCE_CASES))
def test_damaged_evidence_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    damage, words = EVIDENCE_CASES[case]
    bundle = copy_bundle(tmp_path)
    damage(bundle)
    assert main(["diagnose", str(bundle)]) == 1
    one_error_line(capsys, "evidence.json", words)


def test_evidence_json_that_is_a_fifo_or_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = copy_bundle(tmp_path)
    (bundle / "evidence.json").unlink()
    os.mkfifo(bundle / "evidence.json")  # a reader that opened it plainly would block forever
    assert main(["diagnose", str(bundle)]) == 1
    one_error_line(capsys, "evidence.json", "not a regular file")


# ---- ledgers that are not files --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_ledger_that_is_dev_zero_or_a_fifo_is_missing_evidence(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path)
    victim = bundle / "ledgers" / "rank001.ledger"
    victim.unlink()
    victim.symlink_to("/dev/zero")  # read whole, as before, it never ends
    snap = load_snapshot(bundle)
    assert list(snap.ranks) == [0] and any("rank 1" in m for m in snap.missing)
    for reader in (read_ledger, lambda p: LedgerTail(p).poll()):
        with pytest.raises(LedgerError, match="not a regular file"):
            reader(victim)
    victim.unlink()
    os.mkfifo(victim)  # opened without O_NONBLOCK, it would block until a writer came
    for reader in (read_ledger, lambda p: LedgerTail(p).poll()):
        with pytest.raises(LedgerError, match="not a regular file"):
            reader(victim)
    assert list(load_snapshot(bundle).ranks) == [0]


# ---- implausible records -------------------------------------------------------------------------


def test_records_with_steps_far_from_the_rest_are_dropped(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=64, meta_size=0)
    key = GraphKey(CUDAGraphMode.FULL, 8, 8)
    for step in range(20):
        rec.step_begin(step, key, unpadded_tokens=8, unpadded_reqs=8, launch_manifest=0)
        if step == 7:
            rec.step_end(2**62)  # what a slot damaged in place (seqs intact) can say
        rec.step_end(step)
    rec.close()
    led = read_ledger(rec.path)
    assert max(r.step for r in led.records) == 19 and sum(1 for _ in led.records) == 40
    assert any("far from the rest" in p for p in led.problems)


# ---- fuzz ----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_short_fuzz_over_the_stored_scenarios() -> None:
    """The same cases as ``watchdog bench fuzz`` (which runs 100 000+), fewer of them."""
    result = fuzz_range(str(SCENARIOS), 0, 1200, seed=15)
    assert result["failed"] == 0, result["failures"]
    assert result["cases"] == 1200
    # the fuzz reaches the analyzer, not only the rejections
    assert result["outcomes"].get("rejected", 0) > 50 and len(result["outcomes"]) > 3, result["outcomes"]


@pytest.mark.timeout(300)
def test_short_fuzz_of_ledgers_alone() -> None:
    result = ledger_cases(str(SCENARIOS), 2000, seed=15)
    assert result["failures"] == []
    assert 100 < result["parsed"] < 2000, result  # some damage is read around, some rejected


# ---- torn records --------------------------------------------------------------------------------


def test_replayed_interleavings_tear_the_old_reader_never_read_ledger() -> None:
    got = interleavings(schedules=300, seed=3)
    assert got["copy_torn_accepted"] > 0, got  # checks on a copy accept torn records
    assert got["capture_torn_accepted"] == 0, got
    assert got["capture_new_record_read"] > 0, got  # and a complete write is read


@pytest.mark.timeout(120)
def test_a_hammered_ledger_is_never_misread() -> None:
    for chunk in (0, 8):
        got = stress(seconds=1.5, n_slots=16, chunk=chunk)
        assert got["capture_reads"] > 10 and got["capture_records"] > 100, got
        assert got["capture_misread"] == 0, got

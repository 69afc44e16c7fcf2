"""The ledger's core properties: round trip, wrap, never raising into its host, readable after
SIGKILL, torn records skipped, and no misread record under fuzzing."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Recorder, Role
from collectors.format import SLOT_SIZE, Collective, StepBegin, StepEnd, manifest_hash
from collectors.reader import LedgerError, LedgerTail, parse_ledger, read_ledger

KEY = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)


def write_steps(rec: Recorder, n: int) -> None:
    for s in range(n):
        rec.step_begin(s, KEY, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15)
        rec.collective(s, "tp", "all_reduce", "bfloat16", 1024 + s)
        rec.step_end(s)


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=1, world_size=4, n_slots=64)
    ops = [CollectiveOp("all_reduce", "tp", "bfloat16", 4096)] * 3
    h = rec.manifest(Role.MODEL, KEY, ops)
    rec.config(cudagraph_mode="FULL_AND_PIECEWISE")
    write_steps(rec, 3)
    rec.launch(3, Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, 32), h)
    led = read_ledger(rec.path)
    assert (led.header.rank, led.header.world_size, led.header.pid) == (1, 4, os.getpid())
    assert led.config == {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    assert h == manifest_hash(ops) and led.manifests[h].collectives == tuple(ops)
    begins = [r for r in led.records if isinstance(r, StepBegin)]
    assert [b.step for b in begins] == [0, 1, 2] and begins[0].key == KEY and begins[0].padded_reqs == 1
    colls = [r for r in led.records if isinstance(r, Collective)]
    got = [(c.group_seq, c.numel, c.dtype) for c in colls]
    assert got == [(0, 1024, "bfloat16"), (1, 1025, "bfloat16"), (2, 1026, "bfloat16")]
    assert led.records[-1].key.mode is CUDAGraphMode.PIECEWISE  # type: ignore[union-attr]


def test_ring_wraps_and_counts_lost(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    tail = LedgerTail(rec.path)
    write_steps(rec, 2)
    assert len(tail.poll()) == 6
    write_steps(rec, 40)
    led = read_ledger(rec.path)
    assert len(led.records) == 16 and led.lost == 126 - 16
    assert [r.seq for r in led.records] == list(range(110, 126))
    assert len(tail.poll()) == 16 and tail.lost == 120 - 16


def test_unwritable_directory_disables_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="watchdog.ledger"):
        rec = Recorder(blocker / "ledgers", kind=ProcessKind.WORKER, rank=0, world_size=1)
        write_steps(rec, 5)
        rec.meta({"t": "config"})
        rec.close()
    assert not rec.enabled
    assert len(caplog.records) == 1 and "disabled" in caplog.records[0].getMessage()


def test_readable_after_sigkill_and_never_misread(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from collectors import Recorder, ProcessKind, GraphKey, CUDAGraphMode
        rec = Recorder({str(tmp_path)!r}, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=256)
        key = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
        print("ready", flush=True)
        s = 0
        while True:
            rec.step_begin(s, key, unpadded_tokens=s % 1000, unpadded_reqs=15)
            rec.step_end(s)
            s += 1
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        path = tmp_path / "rank000.ledger"
        for _ in range(20):  # read while the writer runs flat out
            for r in read_ledger(path).records:
                assert isinstance(r, StepBegin | StepEnd)
                if isinstance(r, StepBegin):
                    assert r.unpadded_tokens == r.step % 1000 and r.seq == 2 * r.step
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        led = read_ledger(path)
        assert len(led.records) >= 255
        assert all(r.seq == 2 * r.step + (isinstance(r, StepEnd)) for r in led.records)  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_torn_slot_is_skipped(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    write_steps(rec, 2)
    data = bytearray(rec.path.read_bytes())
    led = parse_ledger(bytes(data))
    ring = led.header.ring_offset
    data[ring + 2 * SLOT_SIZE + SLOT_SIZE - 8] ^= 0xFF  # trailer of record 2: as if killed mid-write
    torn = parse_ledger(bytes(data))
    assert torn.skipped == 1 and len(torn.records) == 5
    assert [r.seq for r in torn.records] == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("data", [b"", b"hello", b"TPWDLDG1" + b"\0" * 600, os.urandom(4096)])
def test_foreign_files_give_one_line_errors(data: bytes) -> None:
    with pytest.raises(LedgerError) as err:
        parse_ledger(data, "x.ledger")
    assert "\n" not in str(err.value) and "x.ledger" in str(err.value)


def test_truncated_ledger(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    with pytest.raises(LedgerError, match="truncated"):
        parse_ledger(rec.path.read_bytes()[:-10])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(LedgerError):
        parse_ledger(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=32)), min_size=1, max_size=6))
def test_fuzz_mutated_ledger_only_raises_ledger_error(tmp_path: Path, edits: list[tuple[float, bytes]]) -> None:
    rec = Recorder(tmp_path / "f", kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16, meta_size=1024)
    write_steps(rec, 3)
    data = bytearray(rec.path.read_bytes())
    for where, junk in edits:
        at = int(where * (len(data) - 1))
        data[at : at + len(junk)] = junk
    try:
        led = parse_ledger(bytes(data))
    except LedgerError:
        return
    assert all(0 <= r.seq < 9 for r in led.records)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 8), st.booleans(), st.binary(min_size=1, max_size=8)), min_size=1, max_size=5))
def test_fuzz_torn_records_are_never_misread(tmp_path: Path, tears: list[tuple[int, bool, bytes]]) -> None:
    """A tear leaves a slot's head seq or trailing seq from another write: such a slot is skipped."""
    rec = Recorder(tmp_path / "t", kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16, meta_size=1024)
    write_steps(rec, 3)
    original = set(read_ledger(rec.path).records)
    data = bytearray(rec.path.read_bytes())
    ring = parse_ledger(bytes(data)).header.ring_offset
    for slot, trailer, junk in tears:
        at = ring + slot * SLOT_SIZE + (SLOT_SIZE - 8 if trailer else 0)
        data[at : at + len(junk)] = junk
    led = parse_ledger(bytes(data))
    assert set(led.records) <= original

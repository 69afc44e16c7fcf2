"""The ledger package (collectors/): format round trip, ring, tail reader, failure containment,
reading a live / stuck / killed writer, damaged files, and fuzzing.

Real parts only: real files, real mmap, real child processes and real signals.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.format import (
    CURSOR_OFFSET,
    FORMAT_VERSION,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STATIC,
    MAGIC,
    META_USED_OFFSET,
    SLOT_SIZE,
    TRAILER_OFFSET,
    U32,
    U64,
    Collective,
    CollectiveOp,
    CUDAGraphMode,
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    Launch,
    Manifest,
    ProcessKind,
    Record,
    Role,
    StepBegin,
    StepEnd,
    key_code,
    key_of_code,
    manifest_hash,
)
from collectors.reader import Ledger, LedgerError, ledger_paths, parse_ledger, read_ledger
from collectors.recorder import META_DROPPED_OFFSET, Recorder, open_recorder
from collectors.tail import LedgerTail
from tests.ledger_writer_child import RANK, WORLD, expected, write
from watchdog.bench.torn import stress

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "ledger_writer_child.py"
LOGGER = "watchdog.ledger"
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers ------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Children import collectors from this checkout, whatever editable install is on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def bare(r: Record) -> Record:
    if isinstance(r, StepBegin) and r.launch is not None:
        return dataclasses.replace(r, mono_ns=0, launch=dataclasses.replace(r.launch, mono_ns=0))
    return dataclasses.replace(r, mono_ns=0)


def ledger_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def one_line_error_naming(exc: pytest.ExceptionInfo[LedgerError], path: Path | str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg


def slot_offset(ledger: Ledger | Recorder, seq: int) -> int:
    if isinstance(ledger, Recorder):
        return HEADER_SIZE + ledger._meta_size + (seq % ledger._n) * SLOT_SIZE
    return ledger.header.ring_offset + (seq % ledger.header.n_slots) * SLOT_SIZE


def patch_file(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def assert_valid_child_records(records: tuple[Record, ...] | list[Record]) -> None:
    """Each record is exactly the one the child wrote with that seq; seqs and clocks ascend."""
    for r in records:
        assert bare(r) == expected(r.seq), f"misread record: {r}"
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs)), "seqs must be strictly increasing"
    monos = [r.mono_ns for r in records]
    assert monos == sorted(monos)
    assert all(m > 0 for m in monos)


def start_child(directory: Path, n_slots: int, limit: int = -1) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(n_slots), str(limit)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_records(proc: subprocess.Popen[bytes], path: Path, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"writer child exited early (rc={proc.returncode}): {err}")
        if path.exists() and read_ledger(path).cursor >= at_least:
            return
        time.sleep(0.01)
    pytest.fail(f"writer child wrote fewer than {at_least} records in {timeout}s")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if proc.stderr:
        proc.stderr.close()


# ---- 1. round trip ------------------------------------------------------------------------


def test_round_trip_every_record_kind_meta_and_header(tmp_path: Path) -> None:
    before_wall = time.time_ns()
    before = time.monotonic_ns()
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=3, world_size=4, instance="inst-7", n_slots=64)
    try:
        assert rec.enabled
        assert rec.path == tmp_path / "rank003.ledger"
        full = GraphKey(CUDAGraphMode.FULL, 256, 128, uniform=True, has_lora=True, num_active_loras=2)
        piece = GraphKey(CUDAGraphMode.PIECEWISE, 512)  # num_reqs None
        eager = GraphKey(CUDAGraphMode.NONE, 17, 0)  # num_reqs 0 is not None
        ops = [CollectiveOp("all_reduce", "tp", "bfloat16", 4096), CollectiveOp("all_gather", "tp", "float16", 8)]
        rec.config(model="m", tp=4)
        h = rec.manifest(Role.MODEL, full, ops)
        h_draft = rec.manifest(Role.DRAFTER, piece, ops[:1])
        rec.config(tp=8, extra=[1, 2])
        rec.meta({"t": "rings", "names": ["a", "b"]})

        rec.step_begin(7, full, unpadded_tokens=200, unpadded_reqs=100, padded_reqs=28, placeholders=3)
        rec.launch(7, Role.MODEL, full, h)
        rec.launch(7, Role.DRAFTER, eager)
        rec.collective(7, "tp", "all_reduce", "bfloat16", 1 << 40)
        rec.collective(7, "pp", "send", "float32", 10)
        rec.collective(7, "tp", "all_gather", "float16", 5)
        rec.collective(7, "tp", "some_new_op", "complex32", 1)  # names the format lacks read as "unknown"
        rec.step_end(7, ok=False)
        rec.step_begin(8, piece, unpadded_tokens=0xFFFFFFFF, unpadded_reqs=0)
        rec.step_end(8)
        rec.engine_step(
            9, total_tokens=300, num_reqs=12, num_decode_reqs=10, placeholders=2,
            max_query_len=64, min_query_len=1, running=12, waiting=5,
        )  # fmt: skip
        rec.engine_result(9, ok=True, running=11, waiting=5, finished=1)
        rec.engine_result(10, ok=False, running=0, waiting=0, finished=0)
        rec.engine_queue(running=4, waiting=9)
        rec.step_begin(
            11, full, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15, launch_manifest=h
        )  # the model launch folded in
        after = time.monotonic_ns()

        led = read_ledger(rec.path)
    finally:
        rec.close()

    want = [
        StepBegin(0, 7, 0, full, 200, 100, 28, 3),
        Launch(1, 7, 0, Role.MODEL, full, h),
        Launch(2, 7, 0, Role.DRAFTER, eager, 0),
        Collective(3, 7, 0, "tp", "all_reduce", "bfloat16", 1 << 40, 0),
        Collective(4, 7, 0, "pp", "send", "float32", 10, 0),
        Collective(5, 7, 0, "tp", "all_gather", "float16", 5, 1),
        Collective(6, 7, 0, "tp", "unknown", "unknown", 1, 2),
        StepEnd(7, 7, 0, False),
        StepBegin(8, 8, 0, piece, 0xFFFFFFFF, 0, 0, 0),
        StepEnd(9, 8, 0, True),
        EngineStep(10, 9, 0, 300, 12, 10, 2, 64, 1, 12, 5),
        EngineResult(11, 9, 0, True, 11, 5, 1),
        EngineResult(12, 10, 0, False, 0, 0, 0),
        EngineQueue(13, 0, 4, 9),
        StepBegin(14, 11, 0, full, 30, 15, 1, 15, Launch(14, 11, 0, Role.MODEL, full, h)),
    ]
    assert [bare(r) for r in led.records] == want
    monos = [r.mono_ns for r in led.records]
    assert monos == sorted(monos) and before <= monos[0] and monos[-1] <= after
    assert (led.cursor, led.skipped, led.lost, led.problems) == (len(want), 0, 0, ())

    # meta: entries in order, config merged (later keys win), manifests keyed by their hash
    assert led.meta == (
        {"t": "config", "model": "m", "tp": 4},
        {"t": "manifest", "role": "model", "key": full.to_json(), "collectives": [c.to_json() for c in ops], "hash": h},
        {"t": "manifest", "role": "drafter", "key": piece.to_json(), "collectives": [ops[0].to_json()],
         "hash": h_draft},
        {"t": "config", "tp": 8, "extra": [1, 2]},
        {"t": "rings", "names": ["a", "b"]},
    )  # fmt: skip
    assert led.config == {"model": "m", "tp": 8, "extra": [1, 2]}
    assert h == manifest_hash(ops) == manifest_hash(tuple(ops)) and h_draft == manifest_hash(ops[:1])
    assert h != h_draft
    assert led.manifests == {
        h: Manifest(Role.MODEL, full, tuple(ops), h),
        h_draft: Manifest(Role.DRAFTER, piece, (ops[0],), h_draft),
    }
    launch = led.records[1]
    assert isinstance(launch, Launch) and led.manifests[launch.manifest_hash].key == launch.key

    hd = led.header
    assert (hd.version, hd.kind, hd.rank, hd.world_size) == (FORMAT_VERSION, ProcessKind.WORKER, 3, 4)
    assert hd.pid == os.getpid()
    assert (hd.n_slots, hd.slot_size, hd.instance) == (64, SLOT_SIZE, "inst-7")
    assert hd.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip() and len(hd.boot_id) == 36
    assert hd.host == socket.gethostname()[:64]
    assert before_wall <= hd.start_wall_ns <= time.time_ns()
    assert hd.start_mono_ns <= monos[0] and hd.start_mono_ns >= before
    assert led.rank == 3 and rec.path.stat().st_size == hd.file_size
    assert hd.to_json()["kind"] == "worker"


# ---- 1b. a decode step as one STEP record -------------------------------------------------

FULL32 = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
PIECE32 = GraphKey(CUDAGraphMode.PIECEWISE, 32)
OPS1 = [CollectiveOp("all_reduce", "tp", "bfloat16", 4096)]


def test_a_step_is_one_record_that_takes_its_drafter_launch_and_end_in_place(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=2, n_slots=64)
    try:
        h = rec.manifest(Role.MODEL, FULL32, OPS1)
        hd = rec.manifest(Role.DRAFTER, PIECE32, OPS1 * 2)
        tail = LedgerTail(rec.path)
        begin0 = StepBegin(0, 0, 0, FULL32, 30, 15, 1, 15, Launch(0, 0, 0, Role.MODEL, FULL32, h))
        rec.step_begin(
            0, FULL32, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15, launch_manifest=h
        )
        assert [bare(r) for r in tail.poll()] == [begin0]
        rec.launch(0, Role.DRAFTER, PIECE32, hd)
        # the tail reads no manifests: its in-place launches carry hash 0 (it only needs steps' ends)
        assert [bare(r) for r in tail.poll()] == [Launch(0, 0, 0, Role.DRAFTER, PIECE32, 0)]
        rec.step_end(0)
        assert [bare(r) for r in tail.poll()] == [StepEnd(0, 0, 0, True)]
        assert tail.poll() == []
        assert read_ledger(rec.path).cursor == 1  # the whole step took one slot

        # an eager step: the drafter launch and the end sit among the step's collectives by time
        eager = GraphKey(CUDAGraphMode.NONE, 300)
        rec.step_begin(1, eager, unpadded_tokens=300, unpadded_reqs=2, launch_manifest=0)
        rec.collective(1, "tp", "all_reduce", "bfloat16", 10)
        rec.launch(1, Role.DRAFTER, eager, 0)
        rec.collective(1, "tp", "all_reduce", "bfloat16", 20)
        rec.step_end(1, ok=False)
        rest = [bare(r) for r in tail.poll()]
        led = read_ledger(rec.path)
    finally:
        rec.close()
    step1 = [
        StepBegin(1, 1, 0, eager, 300, 2, 0, 0, Launch(1, 1, 0, Role.MODEL, eager, 0)),
        Collective(2, 1, 0, "tp", "all_reduce", "bfloat16", 10, 0),
        Launch(1, 1, 0, Role.DRAFTER, eager, 0),
        Collective(3, 1, 0, "tp", "all_reduce", "bfloat16", 20, 1),
        StepEnd(1, 1, 0, False),
    ]
    assert rest == step1
    # a whole read resolves the in-place drafter launch's manifest from the meta area
    assert [bare(r) for r in led.records] == [
        begin0,
        Launch(0, 0, 0, Role.DRAFTER, PIECE32, hd),
        StepEnd(0, 0, 0, True),
        *step1,
    ]
    monos = [r.mono_ns for r in led.records]
    assert monos == sorted(monos)
    assert (led.cursor, led.skipped, led.problems) == (4, 0, ())


def test_step_parts_that_cannot_go_in_place_are_records_of_their_own(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "a", kind=ProcessKind.WORKER, rank=0, world_size=2, n_slots=64)
    lapped = Recorder(tmp_path / "b", kind=ProcessKind.WORKER, rank=0, world_size=2, n_slots=4)
    try:
        h = rec.manifest(Role.MODEL, FULL32, OPS1)
        hd = rec.manifest(Role.DRAFTER, PIECE32, OPS1)
        uncaptured = GraphKey(CUDAGraphMode.PIECEWISE, 64)  # no manifest recorded for it
        big = GraphKey(CUDAGraphMode.FULL, 64, 32, uniform=True, has_lora=True, num_active_loras=256)
        assert key_code(big) == 0  # too many LoRAs for the key code
        # a second drafter launch in one step
        rec.step_begin(0, FULL32, unpadded_tokens=30, unpadded_reqs=15, launch_manifest=h)
        rec.launch(0, Role.DRAFTER, PIECE32, hd)
        rec.launch(0, Role.DRAFTER, PIECE32, hd)
        rec.step_end(0)
        # a drafter graph with no recorded manifest: the reader could not resolve its hash
        rec.step_begin(1, FULL32, unpadded_tokens=30, unpadded_reqs=15, launch_manifest=h)
        rec.launch(1, Role.DRAFTER, uncaptured, 0)
        rec.step_end(1)
        # a key the code cannot hold: a STEP_BEGIN_LAUNCH record and separate parts
        rec.step_begin(2, big, unpadded_tokens=60, unpadded_reqs=30, launch_manifest=0)
        rec.launch(2, Role.DRAFTER, PIECE32, hd)
        rec.step_end(2)
        # the end of a step that never opened a STEP record (no model launch folded in)
        rec.step_begin(3, FULL32, unpadded_tokens=30, unpadded_reqs=15)
        rec.step_end(3)
        led = read_ledger(rec.path)

        # the ring reused the step's slot before it ended: the end is a record
        lapped.step_begin(0, FULL32, unpadded_tokens=30, unpadded_reqs=15, launch_manifest=0)
        for i in range(4):
            lapped.collective(0, "tp", "all_reduce", "bfloat16", i)
        lapped.step_end(0)
        lap = read_ledger(lapped.path)
    finally:
        rec.close()
        lapped.close()
    assert [bare(r) for r in led.records] == [
        StepBegin(0, 0, 0, FULL32, 30, 15, 0, 0, Launch(0, 0, 0, Role.MODEL, FULL32, h)),
        Launch(0, 0, 0, Role.DRAFTER, PIECE32, hd),  # in place
        Launch(1, 0, 0, Role.DRAFTER, PIECE32, hd),  # the second: its own record
        StepEnd(0, 0, 0, True),
        StepBegin(2, 1, 0, FULL32, 30, 15, 0, 0, Launch(2, 1, 0, Role.MODEL, FULL32, h)),
        Launch(3, 1, 0, Role.DRAFTER, uncaptured, 0),
        StepEnd(2, 1, 0, True),
        StepBegin(4, 2, 0, big, 60, 30, 0, 0, Launch(4, 2, 0, Role.MODEL, big, 0)),
        Launch(5, 2, 0, Role.DRAFTER, PIECE32, hd),
        StepEnd(6, 2, 0, True),
        StepBegin(7, 3, 0, FULL32, 30, 15, 0, 0),
        StepEnd(8, 3, 0, True),
    ]
    assert led.cursor == 9
    assert [type(r).__name__ for r in lap.records] == ["Collective"] * 3 + ["StepEnd"]
    assert lap.records[-1].seq == 5 and lap.lost == 2


@given(
    mode=st.sampled_from(list(CUDAGraphMode)),
    tokens=st.integers(0, (1 << 32) - 1),
    reqs=st.none() | st.integers(0, (1 << 21)),
    uniform=st.booleans(),
    lora=st.booleans(),
    loras=st.integers(0, 300),
)
@settings(max_examples=400, deadline=None, database=None)
def test_key_code_round_trips_every_key_it_accepts(
    mode: CUDAGraphMode, tokens: int, reqs: int | None, uniform: bool, lora: bool, loras: int
) -> None:
    key = GraphKey(mode, tokens, reqs, uniform=uniform, has_lora=lora, num_active_loras=loras)
    code = key_code(key)
    fits = tokens < (1 << 31) and (reqs is None or reqs < (1 << 20) - 1) and loras < 256
    assert bool(code) == fits
    if fits:
        assert code >> 63 == 1 and key_of_code(code) == key


def test_engine_ledger_name_kind_and_generated_instance(tmp_path: Path) -> None:
    a = Recorder(tmp_path, kind=ProcessKind.ENGINE, rank=-1, world_size=2, n_slots=8)
    b = Recorder(tmp_path / "other", kind=ProcessKind.ENGINE, rank=-1, world_size=2, n_slots=8)
    try:
        assert a.path.name == "engine.ledger"
        ha, hb = read_ledger(a.path).header, read_ledger(b.path).header
        assert (ha.kind, ha.rank, ha.world_size) == (ProcessKind.ENGINE, -1, 2)
        assert len(ha.instance) == 32 and ha.instance != hb.instance  # a fresh id when none is given
    finally:
        a.close()
        b.close()


def test_open_recorder_and_ledger_paths(tmp_path: Path) -> None:
    assert open_recorder(None, kind=ProcessKind.WORKER, rank=0, world_size=1) is None
    assert open_recorder("", kind=ProcessKind.WORKER, rank=0, world_size=1) is None
    recs = [open_recorder(tmp_path, kind=ProcessKind.WORKER, rank=r, world_size=2, n_slots=8) for r in (1, 0)]
    eng = open_recorder(tmp_path, kind=ProcessKind.ENGINE, rank=-1, world_size=2, n_slots=8)
    try:
        assert all(r is not None and r.enabled for r in [*recs, eng])
        (tmp_path / ".rank002.ledger.123.tmp").write_bytes(b"half made")
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / "dir.ledger").mkdir()
        assert [p.name for p in ledger_paths(tmp_path)] == ["engine.ledger", "rank000.ledger", "rank001.ledger"]
        assert [read_ledger(p).rank for p in ledger_paths(tmp_path)] == [-1, 0, 1]
    finally:
        for r in [*recs, eng]:
            assert r is not None
            r.close()


def test_concurrent_writer_threads_get_distinct_slots(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=4096)
    per_thread = 400

    def work(t: int) -> None:
        for i in range(per_thread):
            rec.step_end(t * 100_000 + i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        led = read_ledger(rec.path)
        assert [r.seq for r in led.records] == list(range(4 * per_thread)) and led.skipped == 0
        steps = [r.step for r in led.records if isinstance(r, StepEnd)]
        assert sorted(steps) == [t * 100_000 + i for t in range(4) for i in range(per_thread)]
        for t in range(4):  # each thread's records in its own order
            mine = [s for s in steps if s // 100_000 == t]
            assert mine == sorted(mine)
    finally:
        rec.close()


@FUZZ
@given(
    mode=st.sampled_from(list(CUDAGraphMode)),
    tokens=st.integers(0, 0xFFFFFFFF),
    reqs=st.one_of(st.none(), st.integers(0, 0x7FFFFFFF)),
    uniform=st.booleans(),
    lora=st.booleans(),
    loras=st.integers(0, 0xFFFF),
    u32s=st.lists(st.integers(0, 0xFFFFFFFF), min_size=8, max_size=8),
    step=st.integers(0, 2**63 - 1),  # step and mono are signed 64-bit
    numel=st.integers(0, 2**64 - 1),
    group=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
)
def test_round_trip_field_ranges(
    mode: CUDAGraphMode, tokens: int, reqs: int | None, uniform: bool, lora: bool, loras: int,
    u32s: list[int], step: int, numel: int, group: str,
) -> None:  # fmt: skip
    key = GraphKey(mode, tokens, reqs, uniform, lora, loras)
    a, b, c, d, e, f, g, h = u32s
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(tmp, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8, meta_size=0)
        rec.step_begin(step, key, unpadded_tokens=a, unpadded_reqs=b, padded_reqs=c, placeholders=d)
        rec.launch(step, Role.DRAFTER, key, h)
        rec.collective(step, group, "reduce_scatter", "int8", numel)
        rec.engine_step(
            step, total_tokens=a, num_reqs=b, num_decode_reqs=c, placeholders=d,
            max_query_len=e, min_query_len=f, running=g, waiting=h,
        )  # fmt: skip
        rec.engine_result(step, ok=uniform, running=a, waiting=b, finished=c)
        rec.engine_queue(running=e, waiting=f)
        assert rec.enabled
        led = read_ledger(rec.path)
        rec.close()
    assert [bare(r) for r in led.records] == [
        StepBegin(0, step, 0, key, a, b, c, d),
        Launch(1, step, 0, Role.DRAFTER, key, h),
        Collective(2, step, 0, group, "reduce_scatter", "int8", numel, 0),
        EngineStep(3, step, 0, a, b, c, d, e, f, g, h),
        EngineResult(4, step, 0, uniform, a, b, c),
        EngineQueue(5, 0, e, f),
    ]
    assert led.records[2].seq == 2 and led.records[0].mono_ns <= led.records[-1].mono_ns


# ---- 2. ring wrap -------------------------------------------------------------------------


def test_ring_wrap_keeps_the_last_n_slots_in_order(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    try:
        for i in range(100):
            rec.step_end(1000 + i, ok=bool(i % 2))
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert len(led.records) == 16
    assert [r.seq for r in led.records] == list(range(84, 100))
    assert [(r.step, r.ok) for r in led.records if isinstance(r, StepEnd)] == [
        (1000 + i, bool(i % 2)) for i in range(84, 100)
    ]
    assert (led.lost, led.skipped, led.cursor, led.problems) == (84, 0, 100, ())
    monos = [r.mono_ns for r in led.records]
    assert monos == sorted(monos)


def test_meta_survives_a_ring_that_wrapped_many_times(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=4)
    try:
        ops = [CollectiveOp("all_reduce", "tp", "float32", 64)]
        h = rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8, 8, True), ops)
        for i in range(1000):
            rec.step_end(i)
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert list(led.manifests) == [h] and led.manifests[h].collectives == tuple(ops)
    assert [r.seq for r in led.records] == [996, 997, 998, 999] and led.lost == 996


# ---- 3. LedgerTail ------------------------------------------------------------------------


def test_tail_polls_return_only_new_records(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=64)
    tail = LedgerTail(rec.path)
    try:
        assert tail.poll() == []
        assert tail.header is not None and tail.header.pid == os.getpid()
        for i in range(5):
            rec.step_end(i)
        assert [r.seq for r in tail.poll()] == [0, 1, 2, 3, 4]
        assert tail.poll() == []
        for i in range(5, 8):
            rec.step_end(i)
        got = tail.poll()
        assert [(r.seq, r.step) for r in got if isinstance(r, StepEnd)] == [(5, 5), (6, 6), (7, 7)]
        assert tail.poll() == [] and (tail.lost, tail.skipped, tail.next_seq) == (0, 0, 8)
    finally:
        tail.close()
        rec.close()


def test_tail_counts_lost_records_when_the_writer_laps_it(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    tail = LedgerTail(rec.path)
    try:
        for i in range(10):
            rec.step_end(i)
        assert len(tail.poll()) == 10
        for i in range(10, 110):
            rec.step_end(i)
        got = tail.poll()
        assert [r.seq for r in got] == list(range(94, 110))
        assert tail.lost == 84 and tail.skipped == 0
        for i in range(110, 150):
            rec.step_end(i)
        assert [r.seq for r in tail.poll()] == list(range(134, 150))
        assert tail.lost == 84 + 24
        assert tail.next_seq == 150 == tail.lost + tail.skipped + 10 + 16 + 16
    finally:
        tail.close()
        rec.close()


def test_tail_reopens_when_the_ledger_is_replaced(tmp_path: Path) -> None:
    first = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=2, world_size=4, instance="first", n_slots=16)
    tail = LedgerTail(first.path)
    second: Recorder | None = None
    try:
        for i in range(5):
            first.step_end(i)
        assert [r.seq for r in tail.poll()] == list(range(5))
        assert tail.header is not None and tail.header.instance == "first"

        # a restarted worker: same rank, same path, a new file renamed over the old one
        second = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=2, world_size=4, instance="second", n_slots=32)
        assert second.path == first.path
        first.step_end(99)  # the old process writes on into the unlinked file: not seen
        for i in range(3):
            second.step_end(100 + i)
        got = tail.poll()
        assert [(r.seq, r.step) for r in got if isinstance(r, StepEnd)] == [(0, 100), (1, 101), (2, 102)]
        assert tail.header is not None and (tail.header.instance, tail.header.n_slots) == ("second", 32)
        assert tail.poll() == []
        second.step_end(103)
        assert [r.seq for r in tail.poll()] == [3]
    finally:
        tail.close()
        first.close()
        if second is not None:
            second.close()


def test_tail_never_rereads_records_past_a_lagging_cursor(tmp_path: Path) -> None:
    """A writer killed between storing a slot and bumping the cursor leaves the cursor one short."""
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=16)
    tail = LedgerTail(rec.path)
    try:
        for i in range(10):
            rec.step_end(i)
        patch_file(rec.path, CURSOR_OFFSET, U64.pack(9))
        led = read_ledger(rec.path)
        assert [r.seq for r in led.records] == list(range(10)) and led.cursor == 10
        assert [r.seq for r in tail.poll()] == list(range(10))
        assert tail.poll() == []
        assert tail.poll() == []  # not record 9 again
        rec.step_end(10)  # the writer (alive after all) moves the cursor on
        assert [r.seq for r in tail.poll()] == [10]
        assert tail.poll() == [] and tail.next_seq == 11
    finally:
        tail.close()
        rec.close()


def test_tail_on_missing_empty_and_foreign_files_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "rank000.ledger"
    tail = LedgerTail(path)
    rec: Recorder | None = None
    try:
        with pytest.raises(FileNotFoundError):
            tail.poll()
        path.write_bytes(b"")
        with pytest.raises(LedgerError) as exc:
            tail.poll()
        one_line_error_naming(exc, path)
        path.write_text("hello, not a ledger\n" * 40)
        with pytest.raises(LedgerError) as exc:
            tail.poll()
        one_line_error_naming(exc, path)
        rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
        rec.step_end(1)
        assert [r.seq for r in tail.poll()] == [0]
    finally:
        tail.close()
        if rec is not None:
            rec.close()


# ---- 4. never raises into its host --------------------------------------------------------


def exercise_everything(rec: Recorder) -> None:
    key = GraphKey(CUDAGraphMode.FULL, 8, 8)
    rec.step_begin(1, key, unpadded_tokens=8, unpadded_reqs=8)
    rec.launch(1, Role.MODEL, key, 5)
    rec.collective(1, "tp", "all_reduce", "float32", 4)
    rec.step_end(1)
    rec.engine_step(
        1, total_tokens=1, num_reqs=1, num_decode_reqs=1, placeholders=0,
        max_query_len=1, min_query_len=1, running=1, waiting=0,
    )  # fmt: skip
    rec.engine_result(1, ok=True, running=1, waiting=0, finished=0)
    rec.engine_queue(running=1, waiting=0)
    rec.config(a=1)
    rec.meta({"t": "x"})
    assert rec.manifest(Role.MODEL, key, [CollectiveOp("all_reduce", "tp", "float32", 4)]) == manifest_hash(
        [CollectiveOp("all_reduce", "tp", "float32", 4)]
    )


def unwritable_dirs(tmp_path: Path) -> list[tuple[str, Path]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "taken" / "rank000.ledger").mkdir(parents=True)  # the ledger path is a directory
    return [
        ("parent is a file", a_file / "ledgers"),
        ("under /proc", Path("/proc/watchdog-ledger-test/ledgers")),
        ("ledger path is a directory", tmp_path / "taken"),
    ]


@pytest.mark.parametrize("case", ["parent is a file", "under /proc", "ledger path is a directory"])
def test_unwritable_directory_disables_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    directory = dict(unwritable_dirs(tmp_path))[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rec = Recorder(directory, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
    assert rec.enabled is False
    warnings = ledger_warnings(caplog)
    assert len(warnings) == 1 and str(rec.path) in warnings[0].getMessage()
    exercise_everything(rec)
    exercise_everything(rec)
    rec.close()
    rec.close()
    assert len(ledger_warnings(caplog)) == 1
    assert [r for r in caplog.records if r.name == LOGGER] == warnings  # nothing else logged either
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no tmp file left


@pytest.mark.parametrize(
    "kwargs",
    [{"n_slots": 0}, {"n_slots": -3}, {"meta_size": -1}, {"rank": 2**40}],
    ids=["zero slots", "negative slots", "negative meta", "rank out of range"],
)
def test_impossible_arguments_disable_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kwargs: dict[str, int]
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    args: dict[str, int] = {"rank": 0, "n_slots": 8, "meta_size": 64, **kwargs}
    rec = Recorder(
        tmp_path, kind=ProcessKind.WORKER, world_size=1, rank=args["rank"], n_slots=args["n_slots"],
        meta_size=args["meta_size"],
    )  # fmt: skip
    assert rec.enabled is False
    exercise_everything(rec)
    rec.close()
    assert len(ledger_warnings(caplog)) == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_values_disable_once_and_keep_what_was_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
    try:
        rec.step_end(1)
        rec.config(ok=True)
        assert ledger_warnings(caplog) == []
        rec.collective(1, "tp", "all_reduce", "float32", -1)  # does not fit a u64
        assert rec.enabled is False
        rec.meta({"t": "x", "bad": object()})  # not JSON either; already disabled
        exercise_everything(rec)
        assert len(ledger_warnings(caplog)) == 1
        led = read_ledger(rec.path)
        assert [bare(r) for r in led.records] == [StepEnd(0, 1, 0, True)] and led.config == {"ok": True}
    finally:
        rec.close()


def test_unserialisable_meta_disables_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
    try:
        rec.meta({"t": "x", "bad": object()})
        assert rec.enabled is False
        exercise_everything(rec)
        assert len(ledger_warnings(caplog)) == 1
        led = read_ledger(rec.path)
        assert led.records == () and led.meta == ()
    finally:
        rec.close()


def test_closed_recorder_is_a_silent_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
    rec.step_end(1)
    rec.config(a=1)
    rec.close()
    assert rec.enabled is False
    exercise_everything(rec)
    rec.close()
    led = read_ledger(rec.path)
    assert [r.seq for r in led.records] == [0] and led.meta == ({"t": "config", "a": 1},)
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_meta_overflow_drops_entries_and_the_reader_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8, meta_size=64)
    try:
        rec.config(a=1)  # 8 + 18 bytes: fits
        ops = [CollectiveOp("all_reduce", "tp", "bfloat16", 4096)] * 4
        rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8, 8), ops)  # does not fit
        rec.config(b="x" * 100)  # does not fit
        rec.config(c=2)  # fits in what is left
        rec.step_end(5)
        assert rec.enabled and ledger_warnings(caplog) == []
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert led.meta == ({"t": "config", "a": 1}, {"t": "config", "c": 2}) and led.manifests == {}
    assert [bare(r) for r in led.records] == [StepEnd(0, 5, 0, True)]
    assert U32.unpack_from(rec.path.read_bytes(), META_DROPPED_OFFSET)[0] == 2
    full = [p for p in led.problems if "meta area full" in p]
    assert len(full) == 1 and "2 entries" in full[0] and str(rec.path) in full[0]


def test_no_meta_area_at_all(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8, meta_size=0)
    try:
        rec.config(a=1)
        rec.step_end(1)
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert led.meta == () and len(led.records) == 1 and any("1 entries" in p for p in led.problems)


@pytest.mark.timeout(60)
def test_full_disk_disables_instead_of_killing_the_host(tmp_path: Path) -> None:
    """A sparse ledger on a full filesystem would SIGBUS the worker on its first ring write."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a tiny private tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    code = (
        "import logging, os, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from collectors.recorder import Recorder\n"
        "from collectors.format import ProcessKind\n"
        "r = Recorder(sys.argv[1], kind=ProcessKind.WORKER, rank=0, world_size=1)\n"  # about 1 MiB
        "for i in range(20000):\n"
        "    r.step_end(i)\n"
        "print('enabled', r.enabled, 'files', sorted(os.listdir(sys.argv[1])))\n"
    )
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 77; exec "$2" -c "$3" "$1"'
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(mnt), sys.executable, code],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode == 77 or "unshare failed" in err or "Operation not permitted" in err:
        pytest.skip(f"cannot mount a private tmpfs here: {err.strip()}")
    assert proc.returncode == 0, f"host process died (rc={proc.returncode}): {err}"
    assert out.strip() == "enabled False files []"
    assert err.count("WARNING:watchdog.ledger:") == 1, err


# ---- 5. reading a live, stuck and killed writer -------------------------------------------


@pytest.mark.timeout(60)
def test_a_writer_that_keeps_writing_while_read_is_never_damage(tmp_path: Path) -> None:
    """A live writer overwrites the oldest slots and fills new ones while its ledger is copied: those are
    records lost to the wrap or not yet written, never "unreadable slots" (which would make the analyzer
    distrust the rank: a real vLLM rank running ahead of its peer was read so, 7 slots, and the incident
    came out inconclusive). Slow copies (4 KiB at a time) widen the window; no record is misread."""
    from collectors.capture import capture
    from watchdog.analyzer.completeness import TORN_TOLERANCE, damage

    def slow(mm: Any) -> bytearray:
        out = bytearray()
        for off in range(0, len(mm), 4096):
            out += mm[off : off + 4096]
        return out

    n_slots = 1024
    path = tmp_path / f"rank{RANK:03d}.ledger"
    proc = start_child(tmp_path, n_slots)
    try:
        wait_for_records(proc, path, 4 * n_slots)
        reads, moved = 0, 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline or reads < 20:
            before = read_ledger(path).cursor
            led = parse_ledger(capture(path, slow), str(path))
            reads += 1
            assert_valid_child_records(led.records)
            # a slot or two may still be caught mid-write by a loaded reader (the tolerance); 68 before the fix
            assert led.skipped <= TORN_TOLERANCE, led.problems
            assert damage(led, 0) is None
            moved += led.cursor > before
        assert reads >= 20 and moved, (reads, moved)  # the writer really wrote during the reads
    finally:
        kill(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_slots", [16, 256])
def test_read_live_then_stopped_then_killed_writer(tmp_path: Path, n_slots: int) -> None:
    path = tmp_path / f"rank{RANK:03d}.ledger"
    proc = start_child(tmp_path, n_slots)
    tail: LedgerTail | None = None
    try:
        wait_for_records(proc, path, 4 * n_slots)
        tail = LedgerTail(path)
        tail_seqs: list[int] = []
        reads = 0
        last_cursor = 4 * n_slots
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            led = read_ledger(path)  # a copy of the whole file, taken while the child writes
            reads += 1
            assert led.header.pid == proc.pid and (led.header.rank, led.header.world_size) == (RANK, WORLD)
            assert led.config == {"writer": "ledger_writer_child"}
            assert_valid_child_records(led.records)
            # The cursor only moves forward (a writer that stored it with struct.pack_into passed
            # through 0). What a read hands back may run up to n_slots past the stored cursor.
            assert led.cursor + n_slots >= last_cursor >= 4 * n_slots
            last_cursor = led.cursor
            assert led.lost + led.skipped + len(led.records) == led.cursor
            for _ in range(20):
                polled = tail.poll()  # straight from the shared mapping, slot by slot
                assert_valid_child_records(polled)
                tail_seqs.extend(r.seq for r in polled)
        assert reads >= 5
        assert tail_seqs == sorted(set(tail_seqs)), "the tail returned a record twice or out of order"
        assert tail.next_seq == tail.lost + tail.skipped + len(tail_seqs)
        assert len(tail_seqs) > n_slots

        # stuck: frozen at an arbitrary instruction, possibly half-way through a slot
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        stuck = read_ledger(path)
        assert read_ledger(path).records == stuck.records
        assert_valid_child_records(stuck.records)
        assert stuck.skipped <= 1 and len(stuck.records) >= n_slots - 1
        assert stuck.records[-1].seq >= stuck.cursor - 1

        # dead: SIGKILL; every record is still in the file, unchanged
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        dead = read_ledger(path)
        assert dead.records == stuck.records and dead.cursor == stuck.cursor
        assert_valid_child_records(dead.records)
        rest = tail.poll()
        assert_valid_child_records(rest)
        tail_seqs.extend(r.seq for r in rest)
        assert tail_seqs == sorted(set(tail_seqs)) and tail_seqs[-1] == dead.records[-1].seq
        assert not rest or rest == [r for r in dead.records if r.seq >= rest[0].seq]
        assert tail.poll() == []
    finally:
        if tail is not None:
            tail.close()
        kill(proc)


@pytest.mark.timeout(60)
def test_killed_writer_leaves_a_readable_ledger_with_every_record(tmp_path: Path) -> None:
    """A writer hung after 10000 records, then SIGKILLed: every record it wrote is in the file."""
    path = tmp_path / f"rank{RANK:03d}.ledger"
    proc = start_child(tmp_path, 1 << 14, limit=10_000)
    try:
        wait_for_records(proc, path, 10_000)
        hung = read_ledger(path)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        led = read_ledger(path)
        assert led.records == hung.records
        assert (led.cursor, led.lost, led.skipped, led.problems) == (10_000, 0, 0, ())
        assert [r.seq for r in led.records] == list(range(10_000))
        assert_valid_child_records(led.records)
        assert led.header.pid == proc.pid and led.config == {"writer": "ledger_writer_child"}
    finally:
        kill(proc)


@pytest.mark.timeout(150)
def test_live_hammer_tears_the_old_protocol_and_never_the_new() -> None:
    """A real writer process rewrites an 8-slot ring as fast as it can while this process copies the file
    16 bytes at a time (a reader preempted mid-copy). Today's protocol (busy trailer first; trailers read
    through the map before and after the copy) accepts no torn record; the protocol before the fix (no
    busy mark; seqs checked on the copy) is caught accepting one, so the hammer can see a tear."""
    new = stress(seconds=2.0, n_slots=8, chunk=16, writer="new")
    assert new["capture_reads"] >= 10 and new["capture_records"] > 8, new
    assert new["capture_misread"] == 0, new
    # Tens of tears a second, fewer on a loaded 2-core machine; the cap only bounds a starved run.
    old = stress(seconds=100.0, n_slots=8, chunk=16, writer="old", until="copy")
    assert old["copy_misread"] >= 1, old


# ---- 6. torn and damaged data -------------------------------------------------------------


def written_ledger(tmp_path: Path, n: int = 10, n_slots: int = 16) -> Recorder:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=n_slots, meta_size=512)
    rec.config(a=1)
    rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8, 8), [CollectiveOp("all_reduce", "tp", "float32", 8)])
    rec.config(b=2)
    for seq in range(n):
        write(rec, seq)
    return rec


@pytest.mark.parametrize("where", ["head", "trailer"])
@pytest.mark.parametrize("victim", [0, 4, 9])
def test_a_slot_with_a_bad_seq_is_skipped_and_neighbours_still_read(tmp_path: Path, where: str, victim: int) -> None:
    rec = written_ledger(tmp_path)
    try:
        off = slot_offset(rec, victim) + (0 if where == "head" else TRAILER_OFFSET)
        patch_file(rec.path, off, U64.pack(victim + 16))  # the seq of a later lap
        led = read_ledger(rec.path)
        tail = LedgerTail(rec.path)
        polled = tail.poll()
        tail.close()
    finally:
        rec.close()
    assert [r.seq for r in led.records] == [s for s in range(10) if s != victim]
    assert_valid_child_records(led.records)
    assert led.skipped == 1 and led.lost == 0 and led.cursor == 10
    assert any("1 damaged or torn records skipped" in p for p in led.problems)
    assert polled == list(led.records) and tail.skipped == 1
    assert led.meta[0] == {"t": "config", "a": 1} and len(led.manifests) == 1


@pytest.mark.parametrize(
    ("field_offset", "value"),
    [(8, (99).to_bytes(2, "little")), (32, b"\x07")],  # an unknown kind; a StepBegin mode code beyond the table
    ids=["unknown kind", "unknown mode"],
)
def test_a_slot_with_values_this_version_cannot_name_is_skipped(
    tmp_path: Path, field_offset: int, value: bytes
) -> None:
    rec = written_ledger(tmp_path)
    try:
        patch_file(rec.path, slot_offset(rec, 7) + field_offset, value)  # seq 7 is a StepBegin
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert isinstance(expected(7), StepBegin)
    assert [r.seq for r in led.records] == [0, 1, 2, 3, 4, 5, 6, 8, 9] and led.skipped == 1


def test_a_damaged_meta_entry_hides_it_and_later_ones_only(tmp_path: Path) -> None:
    rec = written_ledger(tmp_path)
    try:
        data = rec.path.read_bytes()
        first_len = U32.unpack_from(data, HEADER_SIZE)[0]
        second = HEADER_SIZE + 8 + first_len  # the manifest entry
        patch_file(rec.path, second + 8 + 3, b"#")
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert led.meta == ({"t": "config", "a": 1},) and led.manifests == {} and led.config == {"a": 1}
    assert any("meta area damaged" in p and str(rec.path) in p for p in led.problems)
    assert len(led.records) == 10 and led.skipped == 0


def test_unreadable_manifest_entries_are_problems_not_crashes(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=0, world_size=1, n_slots=8)
    try:
        rec.meta({"t": "manifest", "role": "model", "key": [1, 2], "collectives": [], "hash": 1})
        rec.meta({"t": "manifest", "role": "nobody", "key": {}, "collectives": [], "hash": 2})
        rec.meta({"t": "manifest", "role": "model", "key": {"mode": "FULL", "num_tokens": 8}, "collectives": [],
                  "hash": float("inf")})  # fmt: skip
        h = rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8), [])
        led = read_ledger(rec.path)
    finally:
        rec.close()
    assert list(led.manifests) == [h]
    assert sum("unreadable capture manifest" in p for p in led.problems) == 2
    # JSON numbers must be finite: the third entry is refused as JSON before it is read as a manifest
    assert sum("meta entry" in p and "Infinity" in p for p in led.problems) == 1


def test_truncated_ledger_raises(tmp_path: Path) -> None:
    rec = written_ledger(tmp_path)
    rec.close()
    data = rec.path.read_bytes()
    for size, words in [(len(data) - 1, "truncated"), (600, "truncated"), (100, "too short"), (0, "too short")]:
        path = tmp_path / f"cut{size}.ledger"
        path.write_bytes(data[:size])
        with pytest.raises(LedgerError, match=words) as exc:
            read_ledger(path)
        one_line_error_naming(exc, path)
        tail = LedgerTail(path)
        with pytest.raises(LedgerError) as exc:
            tail.poll()
        tail.close()
        one_line_error_naming(exc, path)


def reheader(data: bytes, **changes: object) -> bytes:
    """``data`` with static header fields replaced and a correct checksum."""
    names = ["magic", "version", "kind", "rank", "world", "pid", "n_slots", "slot_size", "meta_size",
             "wall", "mono", "host", "instance", "boot"]  # fmt: skip
    fields = dict(zip(names, HEADER_STATIC.unpack_from(data), strict=True))
    fields.update(changes)
    static = HEADER_STATIC.pack(*fields.values())
    out = bytearray(data)
    out[: len(static)] = static
    U32.pack_into(out, HEADER_CRC_OFFSET, zlib.crc32(static))
    return bytes(out)


def foreign_files(good: bytes) -> dict[str, tuple[bytes, str]]:
    rng = random.Random(1234)
    bad_crc = bytearray(good)
    bad_crc[12] ^= 0x01  # rank
    wrong_magic = b"TPWDLDG0" + good[8:]
    return {
        "random bytes": (rng.randbytes(len(good)), "bad magic"),
        "text file": (("a text file, not a ledger\n" * 200).encode(), "bad magic"),
        "wrong magic": (wrong_magic, "bad magic"),
        "bad header crc": (bytes(bad_crc), "checksum"),
        "wrong version": (reheader(good, version=FORMAT_VERSION + 1), f"version {FORMAT_VERSION + 1}"),
        "wrong slot size": (reheader(good, slot_size=64), "impossible sizes"),
        "zero slots": (reheader(good, n_slots=0), "impossible sizes"),
        "unknown process kind": (reheader(good, kind=7), "process kind 7"),
        "too many slots": (reheader(good, n_slots=1 << 30), "impossible sizes"),
    }


@pytest.mark.parametrize(
    "name",
    ["random bytes", "text file", "wrong magic", "bad header crc", "wrong version", "wrong slot size",
     "zero slots", "unknown process kind", "too many slots"],
)  # fmt: skip
def test_foreign_files_raise_a_one_line_ledger_error(tmp_path: Path, name: str) -> None:
    rec = written_ledger(tmp_path / "src")
    rec.close()
    good = rec.path.read_bytes()
    data, words = foreign_files(good)[name]
    path = tmp_path / "rank005.ledger"
    path.write_bytes(data)
    with pytest.raises(LedgerError, match=words) as exc:
        read_ledger(path)
    one_line_error_naming(exc, path)
    with pytest.raises(LedgerError) as exc2:
        parse_ledger(data, str(path))
    one_line_error_naming(exc2, path)
    tail = LedgerTail(path)
    try:
        with pytest.raises(LedgerError) as exc3:
            tail.poll()
        one_line_error_naming(exc3, path)
    finally:
        tail.close()


def test_unreadable_paths_raise_a_one_line_ledger_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.ledger", tmp_path):
        with pytest.raises(LedgerError, match="cannot read ledger") as exc:
            read_ledger(path)
        one_line_error_naming(exc, path)


# ---- 7. fuzzing ---------------------------------------------------------------------------

FUZZ_SLOTS = 16
FUZZ_META = 1024
FUZZ_RECORDS = 40  # wraps the ring: every slot holds a record


@cache
def fuzz_ledger() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(tmp, kind=ProcessKind.WORKER, rank=0, world_size=2, n_slots=FUZZ_SLOTS, meta_size=FUZZ_META)
        rec.config(model="m", tp=2)
        model = [CollectiveOp("all_reduce", "tp", "float32", 64)]
        rec.manifest(Role.MODEL, GraphKey(CUDAGraphMode.FULL, 8, 8, True), model)
        rec.manifest(Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, 16), [CollectiveOp("all_gather", "tp", "int8", 4)])
        for seq in range(FUZZ_RECORDS):
            write(rec, seq)
        rec.close()
        return rec.path.read_bytes()


@cache
def fuzz_original() -> Ledger:
    led = parse_ledger(fuzz_ledger(), "orig")
    assert [r.seq for r in led.records] == list(range(FUZZ_RECORDS - FUZZ_SLOTS, FUZZ_RECORDS))
    assert len(led.meta) == 3 and len(led.manifests) == 2 and led.problems == ()
    return led


def check_parse_only_raises_ledger_error(data: bytes) -> Ledger | None:
    try:
        led = parse_ledger(data, "fuzzed.ledger")
    except LedgerError as exc:
        assert "\n" not in str(exc) and "fuzzed.ledger" in str(exc)
        return None
    assert isinstance(led, Ledger)
    seqs = [r.seq for r in led.records]
    slots = list(dict.fromkeys(seqs))  # each slot's seq where its record appears
    assert slots == sorted(slots) and len(slots) <= 2 * led.header.n_slots
    # a seq comes again only for what a STEP record holds besides its begin: the drafter launch, the end
    again = [r for r, first in zip(led.records, _firsts(seqs), strict=True) if not first]
    assert all(isinstance(r, StepEnd) or (isinstance(r, Launch) and r.role is Role.DRAFTER) for r in again)
    assert max(Counter(seqs).values(), default=0) <= 3
    return led


def _firsts(seqs: list[int]) -> list[bool]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        out.append(s not in seen)
        seen.add(s)
    return out


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_random_bytes_parse_or_raise_ledger_error(data: bytes) -> None:
    check_parse_only_raises_ledger_error(data)


@FUZZ
@given(
    version=st.one_of(st.just(FORMAT_VERSION), st.integers(0, 0xFFFF)),
    kind=st.integers(0, 3),
    n_slots=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    slot_size=st.one_of(st.just(SLOT_SIZE), st.integers(0, 2**32 - 1)),
    meta_size=st.one_of(st.integers(0, 256), st.integers(0, 2**32 - 1)),
    counters=st.binary(min_size=28, max_size=28),  # cursor, meta_used, crc slot, pad, dropped
    body=st.binary(max_size=2048),
    pad_to_size=st.booleans(),
    good_crc=st.booleans(),
)
def test_fuzz_valid_header_over_random_contents(
    version: int, kind: int, n_slots: int, slot_size: int, meta_size: int, counters: bytes,
    body: bytes, pad_to_size: bool, good_crc: bool,
) -> None:  # fmt: skip
    static = HEADER_STATIC.pack(MAGIC, version, kind, 0, 1, 1, n_slots, slot_size, meta_size, 1, 1, b"h", b"i", b"b")
    head = bytearray(HEADER_SIZE)
    head[: len(static)] = static
    head[CURSOR_OFFSET : CURSOR_OFFSET + 28] = counters
    if good_crc:
        U32.pack_into(head, HEADER_CRC_OFFSET, zlib.crc32(static))
    data = bytes(head) + body
    want = HEADER_SIZE + meta_size + n_slots * SLOT_SIZE
    if pad_to_size and len(data) < want <= 64 * 1024:
        data += (body or b"\x01") * ((want - len(data)) // max(1, len(body)) + 1)
    led = check_parse_only_raises_ledger_error(data)
    if led is not None:
        assert good_crc and version == FORMAT_VERSION and slot_size == SLOT_SIZE


INTERESTING = sorted(
    {0, 8, 188, CURSOR_OFFSET, META_USED_OFFSET, HEADER_CRC_OFFSET, META_DROPPED_OFFSET, HEADER_SIZE}
    | {HEADER_SIZE + FUZZ_META + s * SLOT_SIZE + o for s in range(FUZZ_SLOTS) for o in (0, 8, 16, TRAILER_OFFSET)}
)
FUZZ_SIZE = HEADER_SIZE + FUZZ_META + FUZZ_SLOTS * SLOT_SIZE
offsets = st.one_of(
    st.integers(0, FUZZ_SIZE - 1),
    st.builds(lambda base, d: min(FUZZ_SIZE - 1, base + d), st.sampled_from(INTERESTING), st.integers(0, 7)),
)
damage_op = st.one_of(
    st.tuples(st.just("flip"), offsets, st.binary(min_size=1, max_size=8).filter(any)),
    st.tuples(st.just("write"), offsets, st.binary(min_size=1, max_size=24)),
)


def apply_damage(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for how, off, chunk in ops:
        chunk = chunk[: len(out) - off]
        if how == "flip":
            out[off : off + len(chunk)] = bytes(a ^ b for a, b in zip(out[off : off + len(chunk)], chunk, strict=True))
        else:
            out[off : off + len(chunk)] = chunk
    return bytes(out)


def check_damaged_parse(orig_data: bytes, damaged: bytes) -> Ledger | None:
    orig = fuzz_original()
    changed = {i for i, (a, b) in enumerate(zip(orig_data, damaged, strict=True)) if a != b}
    header_hit = any(i < HEADER_STATIC.size or HEADER_CRC_OFFSET <= i < HEADER_CRC_OFFSET + 4 for i in changed)
    led = check_parse_only_raises_ledger_error(damaged)
    if header_hit:
        assert led is None, "a damaged header must be refused"
        return None
    assert led is not None, "damage outside the header must not make the file unreadable"

    ring = orig.header.ring_offset
    by_slot = {r.seq % FUZZ_SLOTS: r for r in orig.records}

    def hit(slot: int, lo: int, hi: int) -> bool:
        base = ring + slot * SLOT_SIZE
        return any(base + lo <= i < base + hi for i in changed)

    for r in led.records:
        slot = r.seq % FUZZ_SLOTS
        o = by_slot[slot]
        # The seq is stored twice; it can only read as another seq if both copies were rewritten.
        if not (hit(slot, 0, 8) and hit(slot, TRAILER_OFFSET, SLOT_SIZE)):
            assert r.seq == o.seq, f"slot {slot} misread as seq {r.seq}"
        # Slot contents carry no checksum (by design), so only an untouched kind and payload must
        # read back exactly as written.
        if not hit(slot, 8, TRAILER_OFFSET):
            assert dataclasses.replace(r, seq=o.seq) == o, f"misread record {r}, wrote {o}"

    # damage to one slot never hides its neighbours
    cursor_hit = any(CURSOR_OFFSET <= i < CURSOR_OFFSET + 8 for i in changed)
    if not cursor_hit:
        got = {r.seq for r in led.records}
        for slot, o in by_slot.items():
            if not hit(slot, 0, SLOT_SIZE):
                assert o.seq in got, f"undamaged record {o.seq} went missing"
    # meta: never a made-up entry, only a prefix of what was written
    assert led.meta == orig.meta[: len(led.meta)]
    assert all(led.manifests[h] == orig.manifests.get(h) for h in led.manifests)
    meta_hit = any(HEADER_SIZE <= i < ring or META_USED_OFFSET <= i < META_USED_OFFSET + 8 for i in changed)
    if not meta_hit:
        assert led.meta == orig.meta
    return led


@FUZZ
@given(ops=st.lists(damage_op, min_size=1, max_size=6))
def test_fuzz_damaged_ledger_never_misreads(ops: list[tuple[str, int, bytes]]) -> None:
    data = fuzz_ledger()
    check_damaged_parse(data, apply_damage(data, ops))


def ring_seq_fields() -> st.SearchStrategy[int]:
    ring = HEADER_SIZE + FUZZ_META
    return st.builds(
        lambda s, o, d: ring + s * SLOT_SIZE + o + d,
        st.integers(0, FUZZ_SLOTS - 1),
        st.sampled_from([0, TRAILER_OFFSET]),
        st.integers(0, 7),
    )


@FUZZ
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["flip", "write"]),
            st.one_of(ring_seq_fields(), st.integers(CURSOR_OFFSET, HEADER_SIZE + FUZZ_META - 1)),
            st.binary(min_size=1, max_size=8).filter(any),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_damage_outside_payloads_returns_only_written_records(ops: list[tuple[str, int, bytes]]) -> None:
    """Seqs, cursor and meta damaged, payloads intact: every record returned is one that was written."""
    data = fuzz_ledger()
    damaged = apply_damage(data, ops)
    led = check_damaged_parse(data, damaged)
    if led is None:
        return
    ring = HEADER_SIZE + FUZZ_META
    changed = [i for i in range(ring, len(data)) if data[i] != damaged[i]]
    written = set(fuzz_original().records)
    for r in led.records:
        base = ring + (r.seq % FUZZ_SLOTS) * SLOT_SIZE
        payload_hit = any(base + 8 <= i < base + TRAILER_OFFSET for i in changed)
        seqs_hit = [any(b <= i < b + 8 for i in changed) for b in (base, base + TRAILER_OFFSET)]
        if not payload_hit and not all(seqs_hit):  # a forged seq needs both copies rewritten alike
            assert r in written, f"misread record {r}"

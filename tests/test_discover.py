"""Finding vLLM-layout shm rings from outside: sizes, flags, owners in /proc and roles.

The real-process test builds the demo engine's ring set (one broadcast ring read by three workers,
one response ring per worker) between real processes and discovers it from the live /proc.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.demo.shmring import ShmRing
from watchdog.evidence.discover import (
    DEFAULT_CANDIDATES,
    MAX_READERS,
    Discovery,
    discover_rings,
    generic_layout,
    map_owners,
    solve_layouts,
)
from watchdog.evidence.rings import RingLayout, inspect_ring

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
SMALL = (4, 4096)  # max_chunks, max_chunk_bytes of the small test rings

# A worker: reads the engine's broadcast message as reader `rank`, answers on its own response ring, waits.
WORKER = """
import sys
from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingLayout
bcast, resp, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = ShmRing.attach(bcast, RingLayout(3, 4, 4096), reader_rank=rank)
r = ShmRing.attach(resp, RingLayout(1, 4, 4096))
r.enqueue(("ok", rank, b.dequeue(timeout=30)), timeout=30)
print("ready", flush=True)
sys.stdin.read()
"""


def _segment(shm: Path, name: str, size: int, meta: bytes = b"", at: int = 0) -> Path:
    """A sparse file of ``size`` bytes with ``meta`` written at offset ``at``."""
    path = shm / name
    with open(path, "wb") as f:
        f.truncate(size)
        if meta:
            f.seek(at)
            f.write(meta)
    return path


def _ring_file(shm: Path, name: str, layout: RingLayout, flags: bytes = b"") -> Path:
    return _segment(shm, name, layout.total_size, flags, layout.metadata_offset(0))


def _by_name(disc: Discovery) -> dict[str, dict[str, object]]:
    return {r.name: r.to_json() for r in disc.rings}


# ---- real processes, real /dev/shm and /proc -----------------------------------------------


@pytest.mark.timeout(60)
def test_discovers_demo_ring_set_between_real_processes() -> None:
    bcast_layout, resp_layout = RingLayout(3, *SMALL), RingLayout(1, *SMALL)
    rings: list[ShmRing] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        bcast = ShmRing.create(bcast_layout)
        rings.append(bcast)
        resps = [ShmRing.create(resp_layout, reader_rank=0) for _ in range(3)]
        rings.extend(resps)
        bcast.enqueue("step 1")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for rank, resp in enumerate(resps):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, bcast.name, resp.name, str(rank)],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        me = os.getpid()
        known = {me: "engine"} | {p.pid: str(rank) for rank, p in enumerate(procs)}
        layouts = (*DEFAULT_CANDIDATES, SMALL)

        found = {r.name: r for r in discover_rings(known_pids=known, layouts=layouts).rings}
        b = found[bcast.name]
        assert (b.role, b.layout, b.rank) == ("broadcast", bcast_layout, None)
        assert b.owners == tuple(sorted(known))
        for rank, resp in enumerate(resps):
            r = found[resp.name]
            assert (r.role, r.layout, r.rank) == ("response", resp_layout, rank)
            assert r.owners == tuple(sorted((me, procs[rank].pid)))
        # The discovered layout reads the flags: every worker read the broadcast, nobody read a response yet.
        state = inspect_ring(bcast.name, b.layout, b.role)
        assert state.chunks[0].written and state.chunks[0].read == (True, True, True)
        assert [resp.dequeue(timeout=5) for resp in resps] == [("ok", rank, "step 1") for rank in range(3)]

        # Without known pids the reader count alone decides.
        plain = {r.name: r for r in discover_rings(layouts=layouts).rings}
        assert [plain[x.name].role for x in rings] == ["broadcast", "response", "response", "response"]
        assert all(plain[x.name].rank is None for x in rings)

        # Worker 1 dies: it no longer maps its rings; its response ring cannot be attributed any more.
        procs[1].kill()
        procs[1].wait(10)
        found = {r.name: r for r in discover_rings(known_pids=known, layouts=layouts).rings}
        assert found[bcast.name].role == "broadcast"
        assert "only ranks [0, 2] of 3 readers" in found[bcast.name].reason
        assert found[resps[1].name].role == "unknown"
        assert found[resps[1].name].owners == (me,)
        assert found[resps[0].name].rank == 0 and found[resps[2].name].rank == 2
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        for ring in rings:
            ring.close()
            ring.unlink()


# ---- sizes and flags -----------------------------------------------------------------------


def test_default_candidates_solve_vllm_sizes_and_reject_the_rest(tmp_path: Path) -> None:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    proc.mkdir()
    bcast16 = RingLayout(4, 10, 16 * MiB)  # rpc_broadcast_mq, TP=4, VLLM_MQ_MAX_CHUNK_BYTES_MB=16
    _ring_file(shm, "psm_bcast16", bcast16, bytes([1, 1, 1, 1, 0]))  # chunk 0: written, reader 3 behind
    _ring_file(shm, "psm_resp10", RingLayout(1, 10, 10 * MiB))  # MessageQueue(1, 1), older default
    _ring_file(shm, "psm_resp24", RingLayout(1, 10, 24 * MiB), bytes([1, 1]))  # newer default
    _ring_file(shm, "psm_demo", RingLayout(2, 10, 1 << 16))
    _segment(shm, "psm_random", 12345)
    sevens = RingLayout(2, 10, 10 * MiB)
    _ring_file(shm, "psm_sevens", sevens, bytes([7]) * sevens.metadata_size)
    _segment(shm, "psm_empty", 0)
    (shm / "psm_dir").mkdir()
    _segment(shm, "odd name!", 100)

    disc = discover_rings(str(shm), str(proc))
    rings = _by_name(disc)
    assert set(rings) == {"psm_bcast16", "psm_resp10", "psm_resp24", "psm_demo"}
    assert rings["psm_bcast16"]["layout"] == bcast16.to_json()
    assert rings["psm_bcast16"]["role"] == "broadcast"
    assert rings["psm_resp10"]["layout"] == {"n_readers": 1, "max_chunks": 10, "max_chunk_bytes": 10 * MiB}
    assert (rings["psm_resp24"]["role"], rings["psm_resp24"]["rank"]) == ("response", None)
    assert rings["psm_demo"]["layout"] == {"n_readers": 2, "max_chunks": 10, "max_chunk_bytes": 1 << 16}
    assert all(r["owners"] == [] for r in rings.values())
    assert inspect_ring("psm_bcast16", bcast16, "broadcast", str(shm)).unread_by(3) == 1

    skipped = dict(s.split(": ", 1) for s in disc.skipped)
    assert set(skipped) == {"psm_random", "psm_sevens", "psm_empty", "psm_dir", "'odd name!'"}
    assert "fit no ring layout" in skipped["psm_random"]
    assert "flag byte 7" in skipped["psm_sevens"]
    assert skipped["psm_empty"] == "empty"
    assert skipped["psm_dir"] == "not a regular file"
    assert disc.to_json()["skipped"] == list(disc.skipped)


def test_default_candidates_include_the_demo_engine_defaults() -> None:
    from watchdog.demo.engine import EngineArgs  # imports torch: only here

    fields = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    assert (fields["ring_chunks"], fields["ring_chunk_bytes"]) in DEFAULT_CANDIDATES


def test_generic_layout_needs_owners_to_confirm(tmp_path: Path) -> None:
    """A VLLM_MQ_MAX_CHUNK_BYTES_MB=20 ring: no default fits; 10 x 20 MiB is taken only if 3 processes map it."""
    layout = RingLayout(2, 10, 20 * MiB)
    assert solve_layouts(layout.total_size) == [] and generic_layout(layout.total_size) == layout
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    _ring_file(shm, "psm_mb20", layout)
    for pid in (10, 11):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "maps").write_text(f"7f00-7f10 rw-s 00000000 00:1a 9 {shm}/psm_mb20\n")
    disc = discover_rings(str(shm), str(proc))
    assert disc.rings == () and "2 owners disagree" in disc.skipped[0]
    (proc / "12").mkdir()
    (proc / "12" / "maps").write_text(f"7f00-7f10 rw-s 00000000 00:1a 9 {shm}/psm_mb20\n")
    (ring,) = discover_rings(str(shm), str(proc)).rings
    assert ring.layout == layout and ring.owners == (10, 11, 12) and ring.reason.startswith("generic layout")


# ---- owners from a fake /proc --------------------------------------------------------------


def _fake_proc(proc: Path, shm: Path, maps: dict[int, list[str]], fds: dict[int, list[str]]) -> None:
    for pid, names in maps.items():
        (proc / str(pid)).mkdir(parents=True, exist_ok=True)
        lines = ["55d0-55d1 r-xp 00000000 08:01 77 /usr/bin/python3.11", "7ffd-7ffe rw-p 00000000 00:00 0 [stack]"]
        lines += [f"7f{i:02x}-7f{i + 1:02x} rw-s 00000000 00:1a {i} {shm / n}" for i, n in enumerate(names)]
        lines.append("7e00-7e01 rw-p 00000000 00:00 0")  # anonymous: five fields, no path
        (proc / str(pid) / "maps").write_text("\n".join(lines) + "\n")
    for pid, names in fds.items():
        (proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        for fd, n in enumerate(names, start=3):
            os.symlink(shm / n, proc / str(pid) / "fd" / str(fd))


def test_owners_and_roles_from_a_fake_proc_tree(tmp_path: Path) -> None:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    small_b, small_r = RingLayout(2, *SMALL), RingLayout(1, *SMALL)
    _ring_file(shm, "psm_b", small_b)
    for name in ("psm_r0", "psm_r1", "psm_other", "psm_leaked"):
        _ring_file(shm, name, small_r)
    # engine 100, workers 101 (rank 0) and 102 (rank 1), 999 another deployment's process
    _fake_proc(
        proc,
        shm,
        maps={100: ["psm_b", "psm_r0 (deleted)"], 101: ["psm_b"], 102: ["psm_b", "psm_r1"], 999: ["psm_other"]},
        fds={100: ["psm_r1"], 101: ["psm_r0"]},
    )
    (proc / "103" / "maps").mkdir(parents=True)  # unreadable: reading a directory fails
    (proc / "104").mkdir()  # vanished: no maps, no fd
    (proc / "self").write_text("not a pid")

    owners = map_owners(["psm_b", "psm_r0", "psm_r1", "psm_other", "psm_leaked"], str(shm), str(proc))
    assert owners == {
        "psm_b": (100, 101, 102),
        "psm_r0": (100, 101),
        "psm_r1": (100, 102),
        "psm_other": (999,),
        "psm_leaked": (),
    }

    known = {100: "engine", 101: "0", 102: "1"}
    rings = {r.name: r for r in discover_rings(str(shm), str(proc), known, layouts=[SMALL]).rings}
    assert (rings["psm_b"].role, rings["psm_b"].owners) == ("broadcast", (100, 101, 102))
    assert (rings["psm_r0"].role, rings["psm_r0"].rank) == ("response", 0)
    assert (rings["psm_r1"].role, rings["psm_r1"].rank) == ("response", 1)
    assert rings["psm_other"].role == "unknown" and "outside this deployment: 999" in rings["psm_other"].reason
    assert rings["psm_leaked"].role == "unknown" and "no readable process" in rings["psm_leaked"].reason
    assert {r.layout for r in rings.values()} == {small_b, small_r}

    # TP=1: one worker maps both one-reader rings with the engine; they cannot be told apart.
    tp1 = {r.name: r for r in discover_rings(str(shm), str(proc), {100: "engine", 101: "0"}, [SMALL]).rings}
    assert tp1["psm_r0"].role == "unknown" and "TP=1" in tp1["psm_r0"].reason
    # Without the engine's pid nothing is attributed to this deployment's engine.
    no_engine = discover_rings(str(shm), str(proc), {101: "0", 102: "1"}, [SMALL]).rings
    assert {r.role for r in no_engine} == {"unknown"}


def test_missing_roots_never_raise(tmp_path: Path) -> None:
    disc = discover_rings(str(tmp_path / "no-shm"), str(tmp_path / "no-proc"))
    assert disc.rings == () and "cannot list" in disc.skipped[0]
    assert map_owners(["psm_x"], str(tmp_path), str(tmp_path / "no-proc")) == {"psm_x": ()}


def test_owner_count_decides_between_layouts_that_both_fit(tmp_path: Path) -> None:
    """4 x 4096 with 3 readers and 4 x 4097 with 2 readers are the same size; all flags are 0 in both readings."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    three = RingLayout(3, 4, 4096)
    assert RingLayout(2, 4, 4097).total_size == three.total_size
    _ring_file(shm, "psm_x", three)
    layouts = [(4, 4096), (4, 4097)]
    disc = discover_rings(str(shm), str(proc), layouts=layouts)
    assert disc.rings == () and "ambiguous" in disc.skipped[0]
    _fake_proc(proc, shm, maps={pid: ["psm_x"] for pid in (1, 2, 3, 4)}, fds={})
    (ring,) = discover_rings(str(shm), str(proc), layouts=layouts).rings
    assert ring.layout == three


# ---- property ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 1 << 20), st.integers(1, MAX_READERS))
def test_size_solves_to_reader_count(chunks: int, chunk_bytes: int, n_readers: int) -> None:
    layout = RingLayout(n_readers, chunks, chunk_bytes)
    assert layout in solve_layouts(layout.total_size, (*DEFAULT_CANDIDATES, (chunks, chunk_bytes)))
    with tempfile.TemporaryDirectory() as tmp:
        shm, proc = Path(tmp) / "shm", Path(tmp) / "proc"
        shm.mkdir()
        proc.mkdir()
        _ring_file(shm, "psm_h", layout)
        disc = discover_rings(str(shm), str(proc), layouts=[(chunks, chunk_bytes)])
    assert [(r.layout.n_readers, r.role) for r in disc.rings] == [
        (n_readers, "broadcast" if n_readers > 1 else "response")
    ]

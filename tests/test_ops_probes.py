"""Probes never wait on evidence work; evidence is not served to the network without a token;
incident bundles stay within their bounds on disk. Real agent processes over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, get, stop, wait_for
from watchdog.retention import Retention, remove_tmp, sweep


def request(port: int, path: str, token: str = "", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def start_agent(tmp: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    (tmp / "ledgers").mkdir(parents=True, exist_ok=True)
    with (tmp / "agent.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "watchdog.cli", "agent", "--ledger-dir", str(tmp / "ledgers"), "--incidents-dir",
             str(tmp / "inc"), "--port", str(port), "--no-native-stacks", *args],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip


def bundle(root: Path, name: str, size: int, mtime: float) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "evidence.json").write_text("{}")
    (root / name / "blob").write_bytes(b"x" * size)
    os.utime(root / name, (mtime, mtime))


def test_retention_deletes_oldest_first_and_keeps_newest_and_unresolved(tmp_path: Path) -> None:
    t = time.time() - 1000
    names = [f"20261202T10000{i}Z-host_hang-abc{i}" for i in range(6)]
    for i, name in enumerate(names):
        bundle(tmp_path, name, 1000, t + i)
    (tmp_path / "ladder.json").write_text("{}")  # not a bundle: never counted nor deleted
    out = sweep(tmp_path, max_count=3, max_bytes=10**9, keep={names[1]})
    assert out.deleted == [names[0], names[2], names[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], names[4], names[5], "ladder.json"])
    # by bytes: the newest stays even when it alone is over the bound
    out = sweep(tmp_path, max_count=100, max_bytes=500, keep=())
    assert out.deleted == [names[1], names[4]] and out.kept == 1
    assert (tmp_path / names[5]).is_dir() and (tmp_path / "ladder.json").is_file()


def test_half_written_bundles_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / ".20261202T100000Z-host_hang-aaaaaa.tmp" / "ledgers").mkdir(parents=True)
    (tmp_path / ".hidden-not-tmp").mkdir()
    seen: list[tuple[int, int, int]] = []
    Retention(tmp_path, 10, 10**9, lambda *a: seen.append(a)).start()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-not-tmp"]
    assert seen == [(0, 0, 0)]
    # A fresh .tmp is a write in progress: a later sweep leaves it for a while.
    (tmp_path / ".new.tmp").mkdir()
    assert remove_tmp(tmp_path, older_than_s=300) == 0 and (tmp_path / ".new.tmp").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_evidence_beyond_loopback_without_a_token_and_bounded_diagnose_now(tmp_path: Path) -> None:
    public, bounded = free_port(), free_port()
    a = start_agent(tmp_path / "a", public, "--host", "0.0.0.0")
    stale = tmp_path / "b" / "inc" / ".20261202T100000Z-host_hang-dead00.tmp"
    stale.mkdir(parents=True)
    b = start_agent(
        tmp_path / "b", bounded, "--api-token", "t", "--diagnose-now-interval-s", "2", "--max-incidents", "2"
    )
    try:
        assert wait_for(lambda: get(public, "/healthz")[0] == 200, 30)
        assert request(public, "/v1/snapshot")[0] == 403
        assert request(public, "/v1/diagnose-now", method="POST")[0] == 403
        assert request(public, "/livez")[0] == 200 and request(public, "/metrics")[0] == 200
        assert request(public, "/docs")[0] == 404

        assert wait_for(lambda: get(bounded, "/healthz")[0] == 200, 30)
        assert not stale.exists()  # removed at start
        assert request(bounded, "/v1/snapshot", "t")[0] == 200
        ids = []
        for i in range(4):
            status, _, body = request(bounded, "/v1/diagnose-now", "t", "POST")
            assert status == 200, body
            ids.append(json.loads(body)["id"])
            status, headers, _ = request(bounded, "/v1/diagnose-now", "t", "POST")
            assert status == 429 and 1 <= int(headers["retry-after"]) <= 2, (i, status, headers)
            time.sleep(2.1)
        # The first incident since the server last progressed is the unresolved one: kept; then the newest.
        kept = sorted(p.name for p in (tmp_path / "b" / "inc").iterdir())
        assert kept == sorted([ids[0], ids[-1]])
        metrics = get(bounded, "/metrics")[1]
        assert 'watchdog_incident_bundles{tp_group="tp0"} 2.0' in metrics
        assert 'watchdog_incident_bundles_deleted_total{tp_group="tp0"} 2.0' in metrics
    finally:
        stop(a)
        stop(b)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_probes_answer_fast_while_50_clients_flood_snapshot(tmp_path: Path) -> None:
    work = tmp_path / "w"
    port = free_port()
    agent = start_agent(work, port)
    demo = None
    stop_flood = threading.Event()
    try:
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, 30)
        demo = subprocess.Popen(
            [sys.executable, "-m", "watchdog.cli", "demo", "--no-watch", "--tp", "2", "--fault", "host-hang",
             "--workdir", str(work), "--timeout", "240"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        # A hung deployment: every snapshot runs py-spy over three live processes.
        wait_for(lambda: json.loads(get(port, "/v1/incidents")[1]), 180)
        codes: list[int] = []

        def flood() -> None:
            while not stop_flood.is_set():
                codes.append(request(port, "/v1/snapshot")[0])

        clients = [threading.Thread(target=flood, daemon=True) for _ in range(50)]
        for c in clients:
            c.start()
        took: dict[str, list[float]] = {"/livez": [], "/healthz": [], "/metrics": []}
        end = time.monotonic() + 20
        while time.monotonic() < end:
            for path, times in took.items():
                t0 = time.monotonic()
                status = request(port, path)[0]
                times.append(time.monotonic() - t0)
                assert status in (200, 503), (path, status)
            time.sleep(0.1)
        stop_flood.set()
        for c in clients:
            c.join(timeout=60)
        p99 = {path: sorted(t)[int(0.99 * (len(t) - 1))] for path, t in took.items()}
        print(f"probe p99 under flood: {p99}; snapshot answers {len(codes)}: "
              f"{codes.count(200)} x 200, {codes.count(429)} x 429")  # fmt: skip
        assert set(codes) <= {200, 429} and codes.count(200) > 0
        assert p99["/livez"] < 1.0 and p99["/healthz"] < 1.0, p99
    finally:
        stop_flood.set()
        if demo is not None:
            stop(demo)
        stop(agent)

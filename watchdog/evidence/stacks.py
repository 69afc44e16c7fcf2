"""Thread stacks of a live process, from py-spy (Python frames, optionally native ones too).

py-spy reads the target's memory from outside, so it works while the target holds the GIL or
sits in a CUDA call forever: exactly the processes a deadlock leaves behind. Every failure is an
``EvidenceError`` with a short reason (not installed, ptrace denied, no such process, timeout,
unparseable output); ``dump_many`` returns those as values so one bad pid never hides the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Protocol

from watchdog.evidence import EvidenceError, json_field
from watchdog.types import Frame, StackDump, ThreadStack


class StackSource(Protocol):
    def dump(self, pid: int, *, native: bool = False, timeout_s: float = 5.0) -> StackDump: ...


class PySpy(StackSource):
    """``py-spy dump --json --pid PID`` with a hard timeout."""

    def __init__(self, executable: str = "", nonblocking: bool = False) -> None:
        self.executable = executable or default_executable()
        # By default py-spy pauses the target for the few ms it reads; --nonblocking never
        # pauses it, at the price of a stack that may tear while the target runs.
        self.nonblocking = nonblocking

    def dump(self, pid: int, *, native: bool = False, timeout_s: float = 5.0) -> StackDump:
        if pid <= 0:
            raise EvidenceError("py-spy", f"invalid pid {pid}")
        argv = [self.executable, "dump", "--json", "--pid", str(pid)]
        argv += ["--native"] if native else []
        argv += ["--nonblocking"] if self.nonblocking else []
        # py-spy prints a Rust backtrace under its error when RUST_BACKTRACE is set; we want one line.
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except FileNotFoundError:
            raise EvidenceError("py-spy", f"py-spy not installed ({self.executable!r} not found)") from None
        except PermissionError:
            raise EvidenceError("py-spy", f"{self.executable!r} is not executable") from None
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()  # reap it and close the pipes
            raise EvidenceError("py-spy", f"timeout after {timeout_s:g} s dumping pid {pid}") from None
        stderr = err.decode(errors="replace")
        if proc.returncode != 0:
            raise EvidenceError("py-spy", _failure_reason(pid, stderr, proc.returncode))
        try:
            return parse_pyspy_json(out.decode(errors="replace"), pid, native)
        except EvidenceError as exc:
            first = _first_line(stderr)
            raise EvidenceError("py-spy", exc.why + (f" (stderr: {first})" if first else "")) from None


def default_executable() -> str:
    """``py-spy`` on PATH, else the one installed beside this Python (a venv whose bin is not on PATH)."""
    if shutil.which("py-spy"):
        return "py-spy"
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.removeprefix("Error: ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _failure_reason(pid: int, stderr: str, returncode: int) -> str:
    # py-spy's messages are not an API; the pid check below is what decides "no such process".
    if not _pid_exists(pid):
        return f"no such process (pid {pid})"
    if "Permission denied" in stderr or "Operation not permitted" in stderr:
        return f"permission denied (ptrace; needs root or CAP_SYS_PTRACE) for pid {pid}"
    if "Failed to find python version" in stderr:
        return f"pid {pid} is not a Python process"
    return f"exit {returncode} for pid {pid}: {_first_line(stderr) or 'no message'}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def parse_pyspy_json(text: str, pid: int, native: bool) -> StackDump:
    """py-spy's ``dump --json`` output -> StackDump. Pure; EvidenceError on anything unexpected."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EvidenceError("py-spy", f"unparseable output ({type(exc).__name__}: {_first_line(str(exc))})") from None
    if not isinstance(raw, list):
        raise EvidenceError("py-spy", f"unparseable output (expected a list of threads, got {type(raw).__name__})")
    try:
        threads = tuple(_pyspy_thread(t, f"threads[{i}]") for i, t in enumerate(raw))
    except ValueError as exc:
        raise EvidenceError("py-spy", f"unparseable output ({exc})") from None
    return StackDump(pid, threads, native)


def _pyspy_thread(t: Any, where: str) -> ThreadStack:
    # py-spy gives null for threads it cannot name (e.g. native threads without a Python name).
    name = t.get("thread_name") if isinstance(t, Mapping) else None
    frames = json_field(t, "frames", list, where)
    return ThreadStack(
        name=name if isinstance(name, str) else "",
        thread_id=json_field(t, "thread_id", int, where),
        active=json_field(t, "active", bool, where),
        frames=tuple(_frame(f, f"{where}.frames[{j}]") for j, f in enumerate(frames)),
    )


def _frame(f: Any, where: str) -> Frame:
    name, filename = json_field(f, "name", str, where), json_field(f, "filename", str, where)
    return Frame(name, filename, json_field(f, "line", int, where))


def dump_many(
    source: StackSource, pids: Iterable[int], *, native: bool = False, timeout_s: float = 5.0
) -> dict[int, StackDump | EvidenceError]:
    """Dump every pid in parallel; each result is a dump or the error that replaced it.

    Returns within about ``timeout_s`` even if a source ignores its timeout: late dumps become
    timeout errors (their threads finish in the background).
    """
    unique = list(dict.fromkeys(pids))
    if not unique:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(len(unique), 16), thread_name_prefix="stack-dump")
    futures = {pid: pool.submit(source.dump, pid, native=native, timeout_s=timeout_s) for pid in unique}
    deadline = time.monotonic() + timeout_s + 1.0  # the grace second covers py-spy's own start-up
    wait_futures(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
    pool.shutdown(wait=False, cancel_futures=True)
    out: dict[int, StackDump | EvidenceError] = {}
    for pid, fut in futures.items():
        if not fut.done():
            out[pid] = EvidenceError("py-spy", f"timeout after {timeout_s:g} s dumping pid {pid}")
            continue
        try:
            out[pid] = fut.result()
        except EvidenceError as exc:
            out[pid] = exc
        except Exception as exc:  # a broken source is missing evidence, not a crashed watchdog
            out[pid] = EvidenceError("stacks", f"pid {pid}: {type(exc).__name__}: {exc}")
    return out


class FakeStacks(StackSource):
    """Canned dumps (or canned errors) per pid; a pid it does not know is 'no such process'."""

    def __init__(
        self,
        dumps: Mapping[int, StackDump | EvidenceError],
        native_dumps: Mapping[int, StackDump | EvidenceError] | None = None,
    ) -> None:
        self.dumps = dict(dumps)
        self.native_dumps = dict(native_dumps) if native_dumps is not None else None
        self.calls: list[tuple[int, bool]] = []

    def dump(self, pid: int, *, native: bool = False, timeout_s: float = 5.0) -> StackDump:
        self.calls.append((pid, native))
        table = self.native_dumps if native and self.native_dumps is not None else self.dumps
        got = table.get(pid, EvidenceError("py-spy", f"no such process (pid {pid})"))
        if isinstance(got, EvidenceError):
            raise got
        return got

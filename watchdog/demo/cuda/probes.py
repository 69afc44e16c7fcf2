"""What NCCL RAS and PyTorch's flight recorder say about a hang, asked from outside the hung ranks.

* NCCL RAS: NCCL's own monitoring thread in every rank listens on localhost:28028 (``ncclras``'s
  line protocol: ``CLIENT PROTOCOL 2``, then ``VERBOSE STATUS``; the reply ends at EOF).
* PyTorch's flight recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0): ProcessGroupNCCL's monitor
  thread dumps the ring of recent collectives when a byte arrives on its FIFO
  ``$TORCH_NCCL_DEBUG_INFO_PIPE_FILE<rank>.pipe``, into ``$TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>``
  (a pickle). ``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` dumps there too, but only once a collective the
  watchdog tracks times out, and collectives inside graph replays are not tracked.

Both are best effort: whatever fails is reported as an error string, never raised.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any

RAS_PORT = 28028
RAS_PROTOCOL = 2


def flight_recorder_env(directory: Path, buffer: int = 2000) -> dict[str, str]:
    """The environment that turns the flight recorder on and lets ``flight_recorder`` dump it."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(buffer),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(directory / "trace_rank_"),
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(directory / "pipe_rank_"),
    }


def nccl_ras(host: str = "127.0.0.1", port: int = RAS_PORT, timeout_s: float = 20.0) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(f"CLIENT PROTOCOL {RAS_PROTOCOL}\n".encode())
            hello = s.recv(4096).decode(errors="replace").strip()
            s.sendall(b"VERBOSE STATUS\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        text = b"".join(chunks).decode(errors="replace")
        return {"hello": hello, "status": text, "elapsed_s": round(time.monotonic() - t0, 3)}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "elapsed_s": round(time.monotonic() - t0, 3)}


def _summarise_trace(dump: Any) -> dict[str, Any]:
    entries = dump.get("entries", []) if isinstance(dump, dict) else []
    states: dict[str, int] = {}
    for e in entries:
        states[str(e.get("state"))] = states.get(str(e.get("state")), 0) + 1
    keep = ("collective_seq_id", "profiling_name", "state", "input_sizes", "input_dtypes", "retired", "timeout_ms")

    def brief(e: dict[str, Any]) -> dict[str, Any]:
        return {k: e.get(k) for k in keep if k in e}

    return {
        "version": dump.get("version") if isinstance(dump, dict) else None,
        "entries": len(entries),
        "states": states,
        "not_completed": [brief(e) for e in entries if e.get("state") != "completed"][-5:],
        "last": [brief(e) for e in entries[-3:]],
    }


def flight_recorder(ranks: range, env: dict[str, str], wait_s: float = 8.0) -> dict[str, Any]:
    """Ask every rank's flight recorder to dump through its FIFO; summarise what comes back."""
    out: dict[str, Any] = {}
    pipe_stem = env["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"]
    dump_stem = env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]
    for rank in ranks:
        pipe, dump = Path(f"{pipe_stem}{rank}.pipe"), Path(f"{dump_stem}{rank}")
        if dump.exists():  # dumped already (on a timeout): keep it, ask for no new one
            continue
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            out[str(rank)] = {"error": f"no dump pipe {pipe}: {exc}"}
            continue
        try:
            os.write(fd, b"1\n")
        finally:
            os.close(fd)
    deadline = time.monotonic() + wait_s
    for rank in ranks:
        if str(rank) in out:
            continue
        dump = Path(f"{dump_stem}{rank}")
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not dump.exists():
            out[str(rank)] = {"error": f"no dump in {wait_s:g} s ({dump})"}
            continue
        time.sleep(0.3)  # the writer may still be writing
        try:
            out[str(rank)] = _summarise_trace(pickle.loads(dump.read_bytes()))
        except Exception as exc:  # a dump we cannot read is a finding, not a crash
            out[str(rank)] = {"error": f"unreadable dump {dump}: {type(exc).__name__}: {exc}"}
    return out


def clear_dumps(env: dict[str, str], ranks: range) -> None:
    for rank in ranks:
        with contextlib.suppress(OSError):
            Path(f"{env['TORCH_NCCL_DEBUG_INFO_TEMP_FILE']}{rank}").unlink()

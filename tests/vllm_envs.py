"""Builds (once, cached) the two real-vLLM environments the vLLM tests run in.

Each is a venv with ``--system-site-packages`` (torch and this project come from the system),
real vLLM installed with ``pip install --no-deps vllm==X`` and only the packages the imported
modules need, pinned (found by importing every hook target's module on a CPU machine).
Cache: ``$WATCHDOG_VLLM_ENVS`` or ``~/.cache/tp-deadlock-watchdog``: ``vllm-<version>/`` and a
shared pip cache (the vLLM wheels are ~250 MB each; the second build is offline-fast).

``python tests/vllm_envs.py [VERSION ...]`` builds them by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_COMMON = [
    "aiohappyeyeballs==2.7.1",
    "aiohttp==3.14.5",
    "apache-tvm-ffi==0.1.15.post2",
    "aiosignal==1.4.0",
    "blake3==1.0.11",
    "cachetools==8.0.2",
    "cbor2==6.3.0",
    "diskcache==5.6.3",
    "distro==1.9.0",
    "einops==0.8.2",
    "frozenlist==1.8.0",
    "gguf==0.19.0",
    "httpcore==1.0.9",
    "httpcore2==2.16.2",
    "httpx2==2.16.2",
    "truststore==0.10.5",
    "httpx==0.28.1",
    "huggingface_hub==2.4.0",
    "ijson==3.6.0",
    "jiter==0.19.0",
    "lark==1.3.1",
    "msgspec==0.22.0",
    "multidict==7.2.1",
    "openai-harmony==0.0.8",
    "openai==3.57.0",
    "partial-json-parser==0.2.1.1.post7",
    "pillow==13.0.0",
    "prometheus-fastapi-instrumentator==8.1.0",
    "propcache==0.5.4",
    "pybase64==1.5.1",
    "python-json-logger==4.2.0",
    "pyzmq==27.3.0",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "setproctitle==1.3.8",
    "tiktoken==0.14.0",
    "tokenizers==0.23.2",
    "tqdm==4.70.1",
    "uvloop==0.23.0",
    "watchfiles==1.3.0",
    "yarl==1.25.1",
]

PINS: dict[str, tuple[str, ...]] = {
    "0.20.1": (
        *_COMMON,
        "transformers==5.24.0",
        "xgrammar==0.1.33",
        "llguidance==1.3.0",
    ),
    "0.33.0": (*_COMMON, "transformers==5.20.0", "xgrammar==0.2.8", "llguidance==1.7.6"),
}
VERSIONS = tuple(PINS)
BUILD_TIMEOUT_S = 900


class EnvUnavailable(Exception):
    """The environment could not be built (no network, no wheel). The message is one line."""


def cache_root() -> Path:
    return Path(os.environ.get("WATCHDOG_VLLM_ENVS") or Path.home() / ".cache" / "tp-deadlock-watchdog")


def _stamp(version: str) -> str:
    text = "\n".join((sys.version, f"vllm=={version}", *PINS[version]))
    return hashlib.sha256(text.encode()).hexdigest()


def env_python(version: str) -> Path:
    """The python of the environment for ``version``, built on first use.

    A cached environment is used only if its stamp matches and every file vLLM's wheel installed is
    still there (a build interrupted or raced by another process leaves a half-extracted ``vllm/``
    that imports as an empty namespace package). Builds hold a lock, so concurrent test runs
    sharing the cache build once and never in each other's directory.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    env = root / f"vllm-{version}"
    with open(root / f".vllm-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(env, version):
            return env / "bin" / "python"
        for stale in root.glob(f".vllm-{version}.*"):  # left by a build that died (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".vllm-{version}.", dir=root))
        tmp.chmod(0o755)
        try:
            _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)], "venv")
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
            pip += ["--disable-pip-version-check"]
            pip += ["--cache-dir", str(root / "pip-cache")]
            _run([*pip, f"vllm=={version}", *PINS[version]], f"pip install vllm=={version}")
            _run([str(tmp / "bin" / "python"), "-c", "import vllm.plugins, vllm.platforms"], f"import vllm=={version}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Paths inside a venv are absolute: built beside the final name, then moved and patched.
        shutil.rmtree(env, ignore_errors=True)
        _relocate(tmp, env)
        (env / "watchdog-stamp").write_text(_stamp(version))
        if not _usable(env, version):
            raise EnvUnavailable(f"vllm=={version}: the environment at {env} is incomplete after building it")
        return env / "bin" / "python"


def _usable(env: Path, version: str) -> bool:
    stamp = env / "watchdog-stamp"
    cfg = env / "pyvenv.cfg"
    if not (
        (env / "bin" / "python").exists()
        and stamp.exists()
        and stamp.read_text() == _stamp(version)
        and cfg.exists()
        and "include-system-site-packages = true" in cfg.read_text()  # torch comes from the system
    ):
        return False
    site = next((env / "lib").glob("python*/site-packages"), None)
    record = site / f"vllm-{version}.dist-info" / "RECORD" if site else None
    if record is None or not record.exists():
        return False
    for line in record.read_text().splitlines():
        rel = line.split(",", 1)[0]
        if rel.startswith("vllm/") and not (site / rel).exists():
            return False
    return True


def _relocate(src: Path, dst: Path) -> None:
    src.rename(dst)
    for script in (dst / "bin").iterdir():  # shebangs and activate scripts name the build path
        try:
            text = script.read_text()
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        if str(src) in text:
            script.write_text(text.replace(str(src), str(dst)))
    cfg = dst / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(str(src), str(dst)))


def _run(cmd: list[str], what: str) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvUnavailable(f"{what}: {exc}") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise EnvUnavailable(f"{what} failed (exit {res.returncode}): {' | '.join(tail)}")


def python_or_skip(version: str) -> Path:
    """The environment's python for a test: skipped when it cannot be built, failed in CI (``WATCHDOG_CI=1``)."""
    import pytest

    try:
        return env_python(version)
    except EnvUnavailable as exc:
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail(f"vLLM {version} environment could not be built: {exc}")
        pytest.skip(f"vLLM {version} environment could not be built (no network?): {exc}")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child in a vLLM environment: this project importable, vLLM quiet."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": str(root), "VLLM_LOGGING_LEVEL": "ERROR", **extra}


if __name__ == "__main__":
    for v in sys.argv[1:] or VERSIONS:
        print(v, env_python(v))

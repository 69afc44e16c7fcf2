"""Process hygiene for every child the project starts: it dies with its parent, from its first instruction.

Two mechanisms, because each has a gap the other closes:
- ``PR_SET_PDEATHSIG``: Linux SIGKILLs the child when its parent dies. Set before any heavy import
  (torch takes seconds to import; a parent killed meanwhile used to leave the child running).
  It does not fire if the parent died before the call, hence the parent-pid check right after it.
- A watcher thread that re-checks the parent pid twice a second: a child re-parented for any
  reason (the parent's death signal lost, a subreaper in between) notices and exits.

Children started with ``multiprocessing`` (spawn) go through ``spawn_entry``: its arguments are
light (the real ones travel as a pickle, unpickled after the death signal is armed), so nothing
heavy is imported before it runs.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no process of ours is orphaned.

    With ``parent_pid`` (the parent's pid as the parent saw it), exit at once if the parent is
    already gone: the death signal is only armed for a parent that is still alive."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def become_subreaper() -> bool:
    """Orphans of our descendants re-parent to us instead of PID 1, so the tree stays ours to stop."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
    """Exit (without cleanup handlers: the parent's side owns them) once the parent is gone."""

    def loop() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def spawn_entry(parent_pid: int, target: str, payload: bytes, *passthrough: Any) -> None:
    """The ``multiprocessing`` target of the demo's engine and workers.

    ``target`` is ``"module:function"``; it is called with ``*pickle.loads(payload), *passthrough``
    (``passthrough`` carries what multiprocessing must pickle itself: queues, pipes)."""
    die_with_parent(parent_pid)
    watch_parent(parent_pid)
    # Ctrl-C reaches the whole foreground process group; the parent stops its children itself,
    # so a child's KeyboardInterrupt would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module, _, name = target.partition(":")
    func = getattr(importlib.import_module(module), name)
    func(*pickle.loads(payload), *passthrough)


def spawn_args(target: str, args: tuple[Any, ...], passthrough: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """``args=`` for ``ctx.Process(target=spawn_entry, args=...)``."""
    return (os.getpid(), target, pickle.dumps(args), *passthrough)

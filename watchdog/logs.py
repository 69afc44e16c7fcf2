"""The services' log: one line per state change, human or JSON lines, optionally mirrored as Kubernetes Events.

Every state change goes through ``event(name, message, **fields)`` on the ``watchdog`` logger:

    listening       the HTTP API is bound (address, role)
    watching        what is watched: the ledger directory and ranks, or the member agents
    ledger          a ledger seen for the first time (or a new incarnation of its process)
    rings           vLLM's shm rings found (names, readers)
    stall           a stall declared (step, age, deadline)
    evidence        evidence gathered (seconds, what is missing)
    incident        an incident written (verdict, culprits, bundle path)
    generation      watchdog run: a server generation started (mode, command)
    restart         watchdog run: restarting one rung safer (or at the same rung)
    give_up         watchdog run: the restart bound was hit
    exited          watchdog run: the server ended by itself
    retention       old bundles deleted to stay within the disk bounds

``text`` lines read ``2026-12-02T10:43:05Z INFO stall: step 41 open 2.31 s > deadline 1.00 s``;
``json`` lines are one object each (``ts``, ``level``, ``event``, ``msg`` and the fields) for log
pipelines. Nothing here raises into the caller: a log line is never worth a crash.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("watchdog")

# Kubernetes Event reason and type for the state changes worth one on the pod (the incident's own
# Event is recorded by kube.incident_actions, together with the eviction, in that order).
KUBE_REASONS: dict[str, tuple[str, str]] = {
    "listening": ("WatchdogStarted", "Normal"),
    "rings": ("WatchdogWatching", "Normal"),
    "stall": ("StallDeclared", "Warning"),
    "restart": ("ServerRestarted", "Warning"),
    "give_up": ("FallbackGaveUp", "Warning"),
}


_state = {"json": False}


def json_lines() -> bool:
    """Whether stderr carries JSON lines now (then every line there must be one)."""
    return _state["json"]


def event(name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, message, extra={"event": name, "fields": fields})


def _stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "event", None)
        line = f"{_stamp(record.created)} {record.levelname} {name + ': ' if name else ''}{record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send the ``watchdog`` logger's lines to ``stream`` (stderr) as ``fmt``; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in [h for h in log.handlers if getattr(h, "_watchdog", False)]:
        log.removeHandler(old)
    handler._watchdog = True  # type: ignore[attr-defined]
    _state["json"] = fmt == "json"
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return handler


class KubeEvents(logging.Handler):
    """Mirror the state changes in ``KUBE_REASONS`` as Kubernetes Events on the pod.

    The API call happens on a thread of its own behind a bounded queue: a slow or absent API
    server must not hold the watch loop, and a burst beyond the queue is dropped (and counted)."""

    def __init__(self, post: Callable[[str, str, str], None], on_error: Callable[[], None], depth: int = 64) -> None:
        super().__init__(logging.INFO)
        self._post, self._on_error = post, on_error
        self._q: queue.Queue[tuple[str, str, str]] = queue.Queue(depth)
        threading.Thread(target=self._drain, name="kube-events", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        reason = KUBE_REASONS.get(getattr(record, "event", "") or "")
        if reason is None:
            return
        try:
            self._q.put_nowait((reason[0], record.getMessage(), reason[1]))
        except queue.Full:
            self._on_error()

    def _drain(self) -> None:
        while True:
            reason, message, kind = self._q.get()
            try:
                self._post(reason, message, kind)
            except Exception as exc:  # the API's failure is counted, never raised into logging
                self._on_error()
                log.warning("kubernetes event %s not recorded: %s", reason, exc)

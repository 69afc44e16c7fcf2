"""Where the server is and whether it is up: the supervisor's side of the resuming proxy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

__all__ = ["GateState", "UpstreamGate"]

GateState = Literal["up", "down", "gave_up"]


class UpstreamGate:
    """Where the server is and whether it is up; thread-safe. Driven by the supervisor."""

    def __init__(self, base_url: str) -> None:
        self._cond = threading.Condition()
        self._base_url = base_url.rstrip("/")
        self._state: GateState = "up"
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []

    @property
    def base_url(self) -> str:
        with self._cond:
            return self._base_url

    def set_base_url(self, url: str) -> None:
        with self._cond:
            self._base_url = url.rstrip("/")

    @property
    def generation(self) -> int:
        """Incremented by every :meth:`going_down`."""
        with self._cond:
            return self._generation

    @property
    def state(self) -> GateState:
        with self._cond:
            return self._state

    def snapshot(self) -> tuple[int, GateState, str]:
        """``(generation, state, base_url)``, read together."""
        with self._cond:
            return self._generation, self._state, self._base_url

    def going_down(self) -> None:
        """The supervisor is about to stop the server on purpose (a restart), or must stop relaying what
        it says (ranks out of step compute wrong tokens): new requests wait, and the attempts in flight
        are cut now (listeners) and continue once the gate is up again."""
        with self._cond:
            self._generation += 1
            self._state = "down"
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def up(self) -> None:
        """The server is ready again (its ``/health`` answered)."""
        self._set("up")

    def gave_up(self) -> None:
        """No restart is coming: requests waiting for one fail with a clear error."""
        self._set("gave_up")

    def wait_up(self, timeout_s: float) -> bool:
        """Wait until the gate is up; False on timeout or when the supervisor gave up."""
        with self._cond:
            self._cond.wait_for(lambda: self._state != "down", timeout=max(0.0, timeout_s))
            return self._state == "up"

    def _set(self, state: GateState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _add_listener(self, listener: Callable[[], None]) -> None:
        """Called (in the caller's thread) after every ``going_down()`` / ``up()`` / ``gave_up()``."""
        with self._cond:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def _remove_listener(self, listener: Callable[[], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

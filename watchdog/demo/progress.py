"""The demo's narration while it waits: a silent demo looks hung."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """One line every ``every_s`` while nothing else is said."""

    def __init__(self, say: Callable[[str], None], started: float, every_s: float = 10.0) -> None:
        self.say, self.started, self.every_s = say, started, every_s
        self.next = started + every_s

    def tick(self, what: str) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.every_s
            self.say(f"{what} ({now - self.started:.0f} s)")

"""Evidence work off the event loop, one gather at a time, shared by whoever asks meanwhile.

The HTTP API runs on one asyncio loop. Probes (/healthz, /livez, /metrics) are answered on the loop
itself and never wait for anything; evidence work (py-spy over every process, reading ledgers,
serializing megabytes) runs on a one-thread executor of its own. Callers who ask for the same
work while it is in flight await the same future instead of starting another; beyond
``max_waiters`` they are told to come back (``Busy``, answered as 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Busy(Exception):
    def __init__(self, retry_after_s: int, why: str) -> None:
        super().__init__(why)
        self.retry_after_s = retry_after_s


class SingleFlight:
    def __init__(self, name: str = "evidence", max_waiters: int = 256) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.max_waiters = max_waiters
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._waiters = 0
        self.runs = 0  # how many times work actually ran (the rest shared it)

    async def run(self, key: str, work: Callable[[], Any], exclusive: bool = False) -> Any:
        """``work()`` on the executor, or the result of the same ``key``'s run already in flight.

        ``exclusive`` work (a forced diagnosis) never shares and never queues behind other work."""
        fut = self._inflight.get(key)
        if fut is None or exclusive:
            if self._inflight:  # other work is running: one gather at a time, so come back
                raise Busy(5, f"{next(iter(self._inflight))} is running now")
            fut = asyncio.get_running_loop().run_in_executor(self.pool, work)
            self.runs += 1
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        elif self._waiters >= self.max_waiters:
            raise Busy(1, "too many callers waiting for evidence")
        self._waiters += 1
        try:
            return await asyncio.shield(fut)  # one impatient caller must not cancel the others' work
        finally:
            self._waiters -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

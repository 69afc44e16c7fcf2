"""A bench client shaped like the seed's (SGLang bench_serving, random dataset).

Output lengths are drawn uniformly from [max(1, int(output_len * range_ratio)), output_len], as
``--random-range-ratio`` does; at most ``concurrency`` requests are in flight.

With ``bursts`` > 1 the requests go out in that many equal bursts (sizes differ by at most one):
before each burst after the first the client waits until every request in flight has finished,
then sends nothing for ``idle_gap_s`` seconds. The server is idle then, not hung, and a watchdog
must stay quiet.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any


@dataclass(frozen=True)
class Workload:
    requests: int = 128
    concurrency: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    seed: int = 0
    bursts: int = 1
    idle_gap_s: float = 0.0

    def draw(self) -> list[tuple[int, int]]:
        rng = random.Random(self.seed)
        lo_in = max(1, int(self.input_len * self.range_ratio))
        lo_out = max(1, int(self.output_len * self.range_ratio))
        return [
            (rng.randint(lo_in, self.input_len), rng.randint(lo_out, self.output_len)) for _ in range(self.requests)
        ]

    def burst_sizes(self) -> list[int]:
        """How many requests each burst sends: ``bursts`` near-equal parts of ``requests``."""
        n = max(1, min(self.bursts, self.requests))
        base, extra = divmod(self.requests, n)
        return [base + (1 if i < extra else 0) for i in range(n)]


@dataclass
class ClientResult:
    total: int
    succeeded: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def failed(self) -> int:
        return self.total - self.succeeded


def run_client(
    workload: Workload,
    requests: Queue[Any],
    results: Queue[Any],
    stop: threading.Event,
    result: ClientResult,
) -> None:
    """Submit with bounded concurrency, burst by burst, until every request finished or ``stop`` is set."""
    drawn = list(enumerate(workload.draw()))
    first = 0
    for i, size in enumerate(workload.burst_sizes()):
        if stop.is_set():
            break
        if i > 0 and workload.idle_gap_s > 0 and stop.wait(workload.idle_gap_s):
            break  # the previous burst has drained: the server sits idle for the gap
        _run_burst(drawn[first : first + size], workload.concurrency, requests, results, stop, result)
        first += size
    result.done.set()


def _run_burst(
    burst: list[tuple[int, tuple[int, int]]],
    concurrency: int,
    requests: Queue[Any],
    results: Queue[Any],
    stop: threading.Event,
    result: ClientResult,
) -> None:
    """Send one burst and wait until every request of it has finished (or ``stop``)."""
    todo = list(reversed(burst))
    in_flight = 0
    while not stop.is_set() and (todo or in_flight):
        while todo and in_flight < concurrency:
            rid, (prompt_len, output_len) = todo.pop()
            requests.put((rid, prompt_len, output_len))
            in_flight += 1
        try:
            _rid, ok, *_ = results.get(timeout=0.1)  # ok False: its text came from mismatched reductions
        except queue.Empty:
            continue
        in_flight -= 1
        if ok:
            result.succeeded += 1


def start_client(workload: Workload, requests: Queue[Any], results: Queue[Any], stop: threading.Event) -> ClientResult:
    result = ClientResult(total=workload.requests)
    threading.Thread(
        target=run_client, args=(workload, requests, results, stop, result), name="bench-client", daemon=True
    ).start()
    return result


def wait(result: ClientResult, stop: threading.Event, poll_s: float = 0.1) -> None:
    while not result.done.is_set() and not stop.is_set():
        time.sleep(poll_s)

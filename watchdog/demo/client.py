"""A bench client shaped like the seed's (SGLang bench_serving, random dataset).

Output lengths are drawn uniformly from [max(1, int(output_len * range_ratio)), output_len], as
``--random-range-ratio`` does; at most ``concurrency`` requests are in flight.
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

    def draw(self) -> list[tuple[int, int]]:
        rng = random.Random(self.seed)
        lo_in = max(1, int(self.input_len * self.range_ratio))
        lo_out = max(1, int(self.output_len * self.range_ratio))
        return [
            (rng.randint(lo_in, self.input_len), rng.randint(lo_out, self.output_len)) for _ in range(self.requests)
        ]


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
    """Submit with bounded concurrency until every request finished or ``stop`` is set."""
    todo = list(enumerate(workload.draw()))
    todo.reverse()
    in_flight = 0
    while not stop.is_set() and (todo or in_flight):
        while todo and in_flight < workload.concurrency:
            rid, (prompt_len, output_len) = todo.pop()
            requests.put((rid, prompt_len, output_len))
            in_flight += 1
        try:
            _rid, ok, _n = results.get(timeout=0.1)
        except queue.Empty:
            continue
        in_flight -= 1
        if ok:
            result.succeeded += 1
    result.done.set()


def start_client(workload: Workload, requests: Queue[Any], results: Queue[Any], stop: threading.Event) -> ClientResult:
    result = ClientResult(total=workload.requests)
    threading.Thread(
        target=run_client, args=(workload, requests, results, stop, result), name="bench-client", daemon=True
    ).start()
    return result


def wait(result: ClientResult, stop: threading.Event, poll_s: float = 0.1) -> None:
    while not result.done.is_set() and not stop.is_set():
        time.sleep(poll_s)

"""An emulated asynchronous device: one stream, executed by a thread.

The host enqueues "kernels" (closures) and returns at once, as with CUDA; ``synchronize()``
blocks the host until the stream drains. So a hang inside a kernel or a collective looks from
outside exactly as on a GPU: the host thread sits in ``synchronize`` while the stream is busy.

``capture()`` records kernels into a graph instead of running them (``torch.cuda.graph``'s
shape); ``replay(graph)`` enqueues the recorded kernels as one unit.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Callable, Iterator

Kernel = Callable[[], object]


class Graph:
    def __init__(self) -> None:
        self.kernels: list[Kernel] = []


class Stream:
    device = "cpu"  # where the kernels' tensors live (torch device string)

    def __init__(self, name: str = "device") -> None:
        self._q: queue.SimpleQueue[Kernel | list[Kernel]] = queue.SimpleQueue()
        self._capturing: Graph | None = None
        self.fault: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def capturing(self) -> bool:
        return self._capturing is not None

    def launch(self, kernel: Kernel) -> None:
        if self._capturing is not None:
            self._capturing.kernels.append(kernel)
        else:
            self._q.put(kernel)

    @contextlib.contextmanager
    def capture(self) -> Iterator[Graph]:
        graph = Graph()
        self._capturing = graph
        try:
            yield graph
        finally:
            self._capturing = None

    def replay(self, graph: Graph) -> None:
        self._q.put(graph.kernels)

    def synchronize(self) -> None:
        done = threading.Event()
        self._q.put(done.set)
        done.wait()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            for kernel in item if isinstance(item, list) else (item,):
                try:
                    kernel()
                except Exception as exc:
                    self._faulted(exc)

    def _faulted(self, exc: BaseException) -> None:
        # A CUDA stream whose NCCL peer vanished does not error out: its kernel spins
        # forever. Gloo raises instead; park the stream so the demo hangs as NCCL would.
        self.fault = exc
        print(f"device stream fault: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
        threading.Event().wait()

"""The resuming proxy's server: uvicorn in a background thread, one asyncio loop, a plain ASGI
application (every path and method is forwarded: a router and middleware would only be paid for on
every request and every token) and a pool of upstream connections per server generation (its
``transport=`` is the seam tests fill)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time

import httpx
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from .exchange import Exchange
from .gate import UpstreamGate
from .pool import ConnectionPool
from .upstream import CONNECT_TIMEOUT_S

__all__ = ["CONNECT_TIMEOUT_S", "ResumingProxy"]

# Upstream connections are kept for the next request of the same server generation: a new
# connection per request cost more than the rest of the proxy's work on it. They expire well
# before a server closes an idle one (uvicorn's and so vLLM's keep-alive is 5 s), and a request
# that still meets a connection closed under it is sent again on another (upstream.py).
_KEEPALIVE_S = 1.0
_STAT_KEYS = ("forwarded", "resubmitted", "resumed_mid_stream", "failed_unresumable", "client_cancelled")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class _App:
    """The ASGI application: each HTTP request is one :class:`Exchange`; a client disconnect cancels it."""

    def __init__(self, proxy: ResumingProxy) -> None:
        self._proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan (off), no websockets
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        method: str = scope["method"]
        if method not in _METHODS:
            body = json.dumps({"detail": "Method Not Allowed"}).encode()
            allow = ", ".join(sorted(_METHODS)).encode()
            raw = [(b"allow", allow), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 405, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            return
        request_body = await _read_body(receive)
        if request_body is None:  # the client left before its request was whole
            return
        proxy = self._proxy
        proxy._bind_loop()
        path: str = scope.get("root_path", "") + scope["path"]
        raw_path = scope.get("raw_path")
        target = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else path
        query = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        exchange = Exchange(proxy, method, target, path, headers, request_body, send)
        main = asyncio.ensure_future(exchange.run())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
            elif exchange.out.ended:  # uvicorn says "disconnect" once the answer is out: not the client's
                await main  # the exchange finishes its upstream side (bounded)
            else:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
                if not exchange.out.ended:
                    proxy.count("client_cancelled")
        finally:
            for task in (main, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class ResumingProxy:
    """The reverse proxy (uvicorn in a background thread).

    ``stats``: ``forwarded`` client requests sent upstream, ``resubmitted`` transparent
    re-submissions (nothing of the answer had reached the client), ``resumed_mid_stream``
    continuations of a mid-way completion stream, ``failed_unresumable`` requests failed because of
    a restart (unresumable stream, gave up, timed out), ``client_cancelled`` client disconnects
    before the answer was complete (their upstream request is cancelled).

    ``transport``: what the upstream requests are sent through (default: HTTP over TCP, connections
    pooled per server generation); tests give an ``httpx.MockTransport`` and drive :attr:`app`
    (ASGI) in-process without :meth:`start`.
    """

    def __init__(
        self,
        gate: UpstreamGate,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        resume_timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.gate = gate
        self.host = host
        self.port = port
        self.resume_timeout_s = resume_timeout_s
        self.live: set[Exchange] = set()
        self._transport = transport
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: httpx.AsyncBaseTransport | None = None
        self._pool_generation = -1
        self._retiring: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.app = _App(self)

    @property
    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    # ---- what an Exchange uses (exchange.Host)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def transport_for(self, generation: int) -> httpx.AsyncBaseTransport:
        """What an attempt made for server ``generation`` is sent through: connections are reused
        within a generation, never across one (a restarted server on the same port is a new pool)."""
        if self._transport is not None:
            return self._transport
        if self._pool is None or generation > self._pool_generation:
            self._retire_pool()
            self._pool = ConnectionPool(keepalive_expiry=_KEEPALIVE_S, ssl_context=ssl.create_default_context())
            self._pool_generation = generation
        return self._pool

    def _retire_pool(self) -> None:
        """Close the pool of a replaced server generation (its attempts are aborted already)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            task = asyncio.ensure_future(pool.aclose())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def wait_gate(self, timeout_s: float) -> None:
        """Return after the next up()/gave_up()/stop(), or after ``timeout_s``."""
        self._bind_loop()
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    # ---- the event loop side

    def _bind_loop(self) -> None:
        """Make the upstream pool and the gate's wake-up belong to the running loop (the server's, or a test's)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._pool = None  # a previous loop's (a test's asyncio.run): its connections went with it
        self._pool_generation = -1
        self._changed = asyncio.Event()
        self._loop = loop
        self.gate._add_listener(self._on_gate_change)

    def _on_gate_change(self) -> None:
        """(Any thread.) After up()/gave_up() the old server is gone: wake the waiters, abort its attempts."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._wake, False)

    def _wake(self, everything: bool) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()
        gen = self.gate.generation
        for exchange in list(self.live):
            if everything or exchange.generation < gen:
                exchange.abort()
        if gen > self._pool_generation:  # the old server's idle connections go now, not at the next request
            self._retire_pool()

    # ---- the server thread

    def start(self) -> None:
        """Serve in a background thread; returns once listening (``port`` is then the bound port)."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an
        # accepted socket inherits the listener's. Without it Nagle holds each small write (a
        # response's body after its headers, a stream's next token) for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            http="h11",
            loop="asyncio",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=3,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(server, sock),), name="resuming-proxy", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the resuming proxy failed to start")
            time.sleep(0.01)

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._bind_loop()
        try:
            await server.serve(sockets=[sock])
        finally:
            self._retire_pool()
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def stop(self) -> None:
        """Stop serving; in-flight requests end (a waiting one gets a 503). Idempotent."""
        self._stopping.set()
        self.gate._remove_listener(self._on_gate_change)
        if self._server is not None:
            self._server.should_exit = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake, True)
        if self._thread is not None:
            self._thread.join(timeout=15.0)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = None

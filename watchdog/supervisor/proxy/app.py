"""The resuming proxy's server: uvicorn + FastAPI in a background thread, one asyncio loop, one
``httpx.AsyncClient`` towards the upstream (its ``transport=`` is the seam tests fill)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .exchange import Exchange
from .gate import UpstreamGate

__all__ = ["CONNECT_TIMEOUT_S", "ResumingProxy"]

CONNECT_TIMEOUT_S = 10.0
# One upstream connection per attempt, as a server that may be killed and restarted under us
# wants: a pooled connection could be reused just as the server closes it (a spurious failure
# the gate cannot tell from a real one). A localhost connect costs far less than the request.
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=0)
_STAT_KEYS = ("forwarded", "resubmitted", "resumed_mid_stream", "failed_unresumable", "client_cancelled")


class _ProxyResponse(Response):
    """Runs one :class:`Exchange` with full control over ``send``; a client disconnect cancels it."""

    def __init__(self, proxy: ResumingProxy, request: Request, body: bytes) -> None:
        super().__init__()
        self._proxy = proxy
        self._request = request
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = self._request
        raw_path = scope.get("raw_path")
        target = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else req.url.path
        query = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        exchange = Exchange(self._proxy, req.method, target, req.url.path, headers, self._body, send)
        main = asyncio.ensure_future(exchange.run())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
            else:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
                if not exchange.out.ended:
                    self._proxy.count("client_cancelled")
        finally:
            for task in (main, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class ResumingProxy:
    """The reverse proxy (uvicorn + FastAPI in a background thread).

    ``stats``: ``forwarded`` client requests sent upstream, ``resubmitted`` transparent
    re-submissions (nothing of the answer had reached the client), ``resumed_mid_stream``
    continuations of a mid-way completion stream, ``failed_unresumable`` requests failed because of
    a restart (unresumable stream, gave up, timed out), ``client_cancelled`` client disconnects
    before the answer was complete (their upstream request is cancelled).

    ``transport``: what the upstream client sends through (default: HTTP over TCP); tests give an
    ``httpx.MockTransport`` and drive :attr:`app` in-process without :meth:`start`.
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
        self._client: httpx.AsyncClient | None = None
        self._changed: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.app = self._make_app()

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

    @property
    def client(self) -> httpx.AsyncClient:
        self._bind_loop()
        assert self._client is not None
        return self._client

    async def wait_gate(self, timeout_s: float) -> None:
        """Return after the next up()/gave_up()/stop(), or after ``timeout_s``."""
        self._bind_loop()
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    # ---- the event loop side

    def _bind_loop(self) -> None:
        """Make the client and the gate's wake-up belong to the running loop (the server's, or a test's)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        transport = self._transport
        if transport is None:
            transport = httpx.AsyncHTTPTransport(verify=ssl.create_default_context(), limits=_LIMITS, retries=0)
        self._client = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S), trust_env=False
        )
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

    def _make_app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

        @app.api_route("/{path:path}", methods=methods, include_in_schema=False)
        async def proxy(request: Request) -> Response:
            self._bind_loop()
            return _ProxyResponse(self, request, await request.body())

        return app

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
            if self._client is not None:
                await self._client.aclose()

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

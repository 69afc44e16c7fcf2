"""The upstream transport: HTTP/1.1 connections kept between requests, the most recent first.

httpcore's own pool looks at every connection it holds on each request and on each response's
close, and again at all of them for each idle one: with the connections of 128 concurrent streams
that scan cost more than the proxying. Here a request takes the connection released last (O(1))
and connections idle for longer than ``keepalive_expiry`` are closed from the other end. It is an
``httpx.AsyncBaseTransport`` over httpcore's connections, so the exchange loop sees the same seam
as with a test's ``MockTransport``.
"""

from __future__ import annotations

import collections
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["ConnectionPool"]

_Key = tuple[bytes, bytes, int]
_HTTPCORE_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError)


class ConnectionPool(httpx.AsyncBaseTransport):
    """Connections to the upstream, kept idle for ``keepalive_expiry`` seconds after each answer."""

    def __init__(self, *, keepalive_expiry: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[_Key, collections.deque[tuple[float, httpcore.AsyncHTTPConnection]]] = {}
        self._open: set[httpcore.AsyncHTTPConnection] = set()
        self._backend = _CoalescingBackend()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.raw_scheme == b"https" else 80)
        key: _Key = (url.raw_scheme, url.raw_host, port)
        conn = await self._take(key)
        if conn is None:
            conn = httpcore.AsyncHTTPConnection(
                httpcore.Origin(*key),
                ssl_context=self._ssl_context,
                keepalive_expiry=self._expiry,
                network_backend=self._backend,
            )
            self._open.add(conn)
        core = httpcore.Request(
            request.method,
            httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            resp = await conn.handle_async_request(core)
        except BaseException as exc:
            await self._close(conn)  # whatever failed, this connection serves no other request
            if isinstance(exc, _HTTPCORE_ERRORS):
                raise _httpx_error(exc) from exc
            raise
        assert isinstance(resp.stream, AsyncIterable)
        body = _Body(self, key, conn, resp.stream)
        return httpx.Response(resp.status, headers=resp.headers, stream=body, extensions=resp.extensions)

    async def _take(self, key: _Key) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get(key)
        while idle:
            since, conn = idle.pop()
            # has_expired: the server closed it (readable while idle), or it outlived keepalive_expiry
            if time.monotonic() - since < self._expiry and conn.is_idle() and not conn.has_expired():
                return conn
            await self._close(conn)
        return None

    async def _release(self, key: _Key, conn: httpcore.AsyncHTTPConnection) -> None:
        """After an answer was read (or dropped): keep the connection if it can serve another request."""
        now = time.monotonic()
        idle = self._idle.setdefault(key, collections.deque())
        while idle and now - idle[0][0] >= self._expiry:  # the longest idle: unused for too long
            await self._close(idle.popleft()[1])
        if conn.is_idle():
            idle.append((now, conn))
        else:  # an unfinished answer's connection is closed by httpcore already
            await self._close(conn)

    async def _close(self, conn: httpcore.AsyncHTTPConnection) -> None:
        self._open.discard(conn)
        await conn.aclose()

    async def aclose(self) -> None:
        conns, self._open = self._open, set()
        self._idle.clear()
        for conn in conns:
            await conn.aclose()


class _Body(httpx.AsyncByteStream):
    """An answer's body from its connection, which goes back to the pool once the body is closed."""

    def __init__(
        self, pool: ConnectionPool, key: _Key, conn: httpcore.AsyncHTTPConnection, stream: AsyncIterable[bytes]
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self._stream = stream
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except _HTTPCORE_ERRORS as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                await close()  # httpcore marks the connection idle, or closes it if the body was unfinished
        finally:
            await self._pool._release(self._key, self._conn)


class _CoalescingBackend(httpcore.AsyncNetworkBackend):
    """anyio's TCP connections whose writes wait for the next read: a request's head and body
    (httpcore writes them apart) leave in one segment, so the server wakes once for it."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _CoalescingStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CoalescingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._pending: list[bytes] = []

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._pending.append(buffer)

    async def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            await self._inner.write(data)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()  # a response is read only once the request is written whole
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._pending.clear()
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        await self._flush()
        return _CoalescingStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _httpx_error(exc: Exception) -> httpx.TransportError:
    """httpcore's error as httpx's of the same name (httpx's transport does the same mapping)."""
    cls = getattr(httpx, type(exc).__name__, None)
    if not (isinstance(cls, type) and issubclass(cls, httpx.TransportError)):
        cls = httpx.TransportError
    return cls(str(exc))

"""An exchange's upstream side: one request through the proxy's transport, its body as it arrives,
closing it. No ``httpx.AsyncClient`` around the transport: its cookie, auth and redirect layers are
of no use to a proxy and were paid on every request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

__all__ = ["CONNECT_TIMEOUT_S", "close", "raw_chunks", "send"]

CONNECT_TIMEOUT_S = 10.0
# Connecting is bounded; an answer may take as long as the model does.
_TIMEOUTS = {"connect": CONNECT_TIMEOUT_S, "read": None, "write": None, "pool": None}
# A request that fails on a reused connection before any answer goes again: the server closed that
# connection as it sat idle, just as the request was sent. Nothing was answered, so nothing reaches
# the client twice. Each failed connection leaves the pool, so this ends; the bound is a guard.
_REUSED_RETRIES = 4


async def send(
    transport: httpx.AsyncBaseTransport,
    request: httpx.Request,
    up: Callable[[Awaitable[httpx.Response]], Awaitable[httpx.Response]],
    restart_caused: Callable[[], bool],
) -> httpx.Response:
    """The upstream's answer to ``request`` (status and headers; the body streams); ``up`` wraps each
    await on the upstream (the exchange's abort point). Raises the transport's error."""
    request.extensions = {**request.extensions, "timeout": _TIMEOUTS}
    for retry in range(_REUSED_RETRIES + 1):
        use = _ConnectionUse()
        request.extensions["trace"] = use
        try:
            return await up(transport.handle_async_request(request))
        except httpx.TransportError:
            if not use.reused or retry == _REUSED_RETRIES or restart_caused():
                raise
    raise AssertionError("unreachable")


class _ConnectionUse:
    """httpcore's trace of one request: was it written to a connection made before it (a reused one)?"""

    def __init__(self) -> None:
        self.connected = False
        self.sent = False

    @property
    def reused(self) -> bool:
        return self.sent and not self.connected

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            self.connected = True
        elif event == "http11.send_request_headers.started":
            self.sent = True


def raw_chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, undecoded (content-encoding passes through to the client)."""
    if resp.is_stream_consumed:  # built in memory (e.g. a MockTransport's content=): already read
        return _once(resp.content)
    return resp.aiter_raw()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def close(resp: httpx.Response) -> None:
    """Release the response: a finished one's connection goes back to the pool; closing an unfinished
    one drops its connection (the server sees the client go away)."""
    with contextlib.suppress(httpx.HTTPError):
        await resp.aclose()

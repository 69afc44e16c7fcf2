"""One client request through as many upstream attempts as restarts require: the proxy's only I/O.

Each attempt is one request with the client's own headers, handed to the proxy's upstream transport
(:mod:`.upstream`: a pool of connections per server generation, or a test's ``MockTransport``).
Every upstream await
goes through :meth:`_Exchange._up`; an attempt made for a server generation that has since been
replaced is aborted by cancelling the exchange's task while it waits on the upstream (never while
it writes to the client), and the cancellation comes back as :class:`Aborted`, an upstream error
like a reset connection. What to send after an interruption is the pure :mod:`.policy`'s call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Literal, Protocol, TypeVar

import httpx
from starlette.types import Send

from . import upstream
from .gate import UpstreamGate
from .policy import StreamState, forward_headers, header, hide_ids, plan_resume
from .sse import DONE_EVENT, carries_token, error_event, event_data, split_events

__all__ = ["BUFFER_LIMIT", "Aborted", "Exchange", "Host"]

BUFFER_LIMIT = 4 * 1024 * 1024
"""A non-SSE answer is held back (so it can be re-submitted) up to this size, then streamed."""
_WAIT_SLICE_S = 0.5
RESTART_TYPE = "watchdog_restart"
GAVE_UP_TYPE = "watchdog_gave_up"

T = TypeVar("T")
_Done = Literal["done", "interrupted"]


class Aborted(Exception):
    """The attempt's server generation was replaced (or the proxy stops): its upstream I/O is cut."""


_UPSTREAM_ERRORS = (httpx.TransportError, Aborted)
_DRAIN_S = 1.0


class Host(Protocol):
    """What an exchange needs of the proxy that runs it."""

    gate: UpstreamGate
    resume_timeout_s: float
    live: set[Exchange]

    def transport_for(self, generation: int) -> httpx.AsyncBaseTransport: ...
    @property
    def stopping(self) -> bool: ...
    def count(self, key: str) -> None: ...
    async def wait_gate(self, timeout_s: float) -> None: ...


class ClientOut:
    """The client's side of the exchange (ASGI ``send``), and how far its answer got."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ended = False

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        self.started = True

    async def body(self, data: bytes) -> None:
        if data:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": False})
        self.ended = True

    async def json_error(self, status: int, message: str, type_: str) -> None:
        body = json.dumps({"error": {"message": message, "type": type_, "code": status}}).encode()
        await self.start(status, [("content-type", "application/json"), ("content-length", str(len(body)))])
        await self.end(body)


class Exchange:
    """One client request, through as many upstream attempts as restarts require."""

    def __init__(
        self, host: Host, method: str, target: str, path: str, headers: list[tuple[str, str]], body: bytes, send: Send
    ) -> None:
        self.host = host
        self.gate = host.gate
        self.method = method
        self.target = target
        self.path = path
        self.body = body
        self.out = ClientOut(send)
        self.json: Any = None
        if body[:1] == b"{":
            with contextlib.suppress(ValueError):
                self.json = json.loads(body)
        self.streaming = isinstance(self.json, dict) and self.json.get("stream") is True
        self.headers = forward_headers(headers, identity=self.streaming)
        self.stream = StreamState()
        # A completion stream asks vLLM for its token ids (return_token_ids), so that a continuation
        # can be sent as token ids; the client gets them only if it asked.
        self.hide_ids = False
        if self.streaming and path == "/v1/completions" and not self.json.get("return_token_ids"):
            self.hide_ids = True
            self.body = json.dumps({**self.json, "return_token_ids": True}).encode()
        self.generation = -1  # of the attempt in progress
        self._task: asyncio.Task[Any] | None = None
        self._stale = False
        self._in_upstream = False

    # ---- cancelling a stale attempt (called on the event loop)

    def abort(self) -> None:
        """Cut the attempt in progress off its upstream: the exchange sees :class:`Aborted`."""
        if self._stale:
            return
        self._stale = True
        if self._in_upstream and self._task is not None:
            self._task.cancel()

    async def _up(self, aw: Awaitable[T]) -> T:
        """Await upstream I/O; the only place a stale attempt's cancellation lands."""
        if self._stale:
            close = getattr(aw, "close", None)
            if close is not None:
                close()
            raise Aborted("upstream exchange aborted")
        self._in_upstream = True
        try:
            return await aw
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stale and task is not None and task.uncancel() == 0:
                raise Aborted("upstream exchange aborted") from None
            raise  # the client went away (or the server stops): a real cancellation
        finally:
            self._in_upstream = False

    async def _read(self, chunks: AsyncIterator[bytes]) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end; raises on a truncated body."""
        while True:
            try:
                data = await self._up(chunks.__anext__())
            except StopAsyncIteration:
                return b""
            if data:
                return data

    # ---- the loop over attempts

    async def run(self) -> None:
        self._task = asyncio.current_task()
        body = self.body
        first = True
        while True:
            if not await self._wait_up():
                return
            gen, state, base_url = self.gate.snapshot()
            if state != "up":  # went down again since: wait for that restart too
                continue
            if first:
                self.host.count("forwarded")
                first = False
            outcome = await self._attempt(base_url, gen, body)
            if outcome == "done":
                return
            # interrupted by a watchdog restart
            plan = plan_resume(
                self.stream,
                started=self.out.started,
                path=self.path,
                request=self.json,
                body=self.body,
                ask_ids=self.hide_ids,
            )
            if plan.kind == "finish":
                await self.out.end(DONE_EVENT)
                return
            if plan.kind == "fail":
                self.host.count("failed_unresumable")
                await self.out.end(error_event(plan.message, RESTART_TYPE) + DONE_EVENT)
                return
            if not await self._wait_up():
                return
            body = plan.body
            if plan.kind == "continue":
                self.stream.begin_continuation(plan.guard)
                self.host.count("resumed_mid_stream")
            else:
                self.stream = StreamState()
                self.host.count("resubmitted")

    async def _wait_up(self) -> bool:
        """Wait for the gate (bounded by resume_timeout_s); on failure answer the client and return False."""
        deadline = time.monotonic() + self.host.resume_timeout_s
        while True:
            state = self.gate.state
            if state == "up":
                return True
            remaining = deadline - time.monotonic()
            if state == "gave_up":
                message = "the server was stopped by the watchdog and no restart is coming (the supervisor gave up)"
                type_ = GAVE_UP_TYPE
            elif self.host.stopping:
                message = "the proxy is shutting down while the server restarts"
                type_ = RESTART_TYPE
            elif remaining <= 0:
                message = (
                    f"the server is restarting (watchdog) and did not come back within {self.host.resume_timeout_s:g} s"
                )
                type_ = RESTART_TYPE
            else:
                await self.host.wait_gate(min(_WAIT_SLICE_S, remaining))
                continue
            self.host.count("failed_unresumable")
            if self.out.started:
                await self.out.end(error_event(message, type_) + DONE_EVENT)
            else:
                await self.out.json_error(503, message, type_)
            return False

    def _restart_caused(self, gen: int) -> bool:
        now_gen, state, _ = self.gate.snapshot()
        return now_gen != gen or state != "up"

    # ---- one attempt

    async def _attempt(self, base_url: str, gen: int, body: bytes) -> _Done:
        self.generation, self._stale = gen, False
        self.host.live.add(self)
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    resp = await upstream.send(
                        self.host.transport_for(gen),
                        httpx.Request(self.method, base_url + self.target, headers=self.headers, content=body),
                        self._up,
                        lambda: self._restart_caused(gen),
                    )
                except _UPSTREAM_ERRORS as exc:
                    if self._restart_caused(gen):
                        return "interrupted"
                    await self._upstream_failed(f"upstream connection failed: {exc!r}")
                    return "done"
                stack.push_async_callback(upstream.close, resp)
                status = resp.status_code
                if status >= 500 and self._restart_caused(gen):
                    return "interrupted"
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.raw]
                headers = forward_headers(raw, identity=False)
                chunks = upstream.raw_chunks(resp)
                if status == 200 and header(headers, "content-type").startswith("text/event-stream"):
                    return await self._pump_sse(chunks, gen, headers)
                if self.out.started:  # a re-submitted stream got no stream back
                    return await self._stream_got_plain(chunks, gen, status)
                return await self._pump_plain(chunks, gen, status, headers)
        finally:
            self.host.live.discard(self)

    async def _upstream_failed(self, message: str) -> None:
        """A failure that is not a restart's: pass it through as well as the client's state allows."""
        if not self.out.started:
            await self.out.json_error(502, message, "upstream_error")
        # else: return without ending the body; the client connection is closed mid-body, as the
        # upstream's was (a truncated chunked body, never a clean end)

    async def _pump_plain(
        self, chunks: AsyncIterator[bytes], gen: int, status: int, headers: list[tuple[str, str]]
    ) -> _Done:
        buf = bytearray()
        while True:
            try:
                data = await self._read(chunks)
            except _UPSTREAM_ERRORS as exc:
                if not self.out.started:
                    if self._restart_caused(gen):
                        return "interrupted"
                    await self._upstream_failed(f"upstream connection failed mid-body: {exc!r}")
                elif self._restart_caused(gen):
                    self.host.count("failed_unresumable")  # too big to have been held back
                return "done"
            if not data:
                break
            if self.out.started:
                await self.out.body(data)
                continue
            buf += data
            if len(buf) > BUFFER_LIMIT:
                await self.out.start(status, headers)
                await self.out.body(bytes(buf))
                buf.clear()
        if self.out.started:
            await self.out.end()
        else:
            await self.out.start(status, [*headers, ("content-length", str(len(buf)))])
            await self.out.end(bytes(buf))
        return "done"

    async def _stream_got_plain(self, chunks: AsyncIterator[bytes], gen: int, status: int) -> _Done:
        buf = bytearray()
        while len(buf) <= BUFFER_LIMIT:
            try:
                data = await self._read(chunks)
            except _UPSTREAM_ERRORS:
                if self._restart_caused(gen):
                    return "interrupted"
                break
            if not data:
                break
            buf += data
        detail = buf[:2000].decode("utf-8", errors="replace")
        message = (
            f"the stream was interrupted by a watchdog restart and its re-submission failed: HTTP {status}: {detail}"
        )
        self.host.count("failed_unresumable")
        await self.out.end(error_event(message, RESTART_TYPE, status) + DONE_EVENT)
        return "done"

    async def _pump_sse(self, chunks: AsyncIterator[bytes], gen: int, headers: list[tuple[str, str]]) -> _Done:
        if not self.out.started:
            await self.out.start(200, headers)
        buf = bytearray()
        while True:
            try:
                data = await self._read(chunks)
            except _UPSTREAM_ERRORS as exc:
                if self._restart_caused(gen):
                    return "interrupted"
                await self._upstream_failed(f"upstream stream failed: {exc!r}")
                return "done"
            if not data:
                if self._restart_caused(gen):
                    return "interrupted"
                await self._flush_held()
                await self.out.end(bytes(buf))  # the upstream ended without [DONE]: so do we
                return "done"
            buf += data
            for raw in split_events(buf):
                outcome = await self._on_event(raw, gen)
                if outcome == "done":  # [DONE]
                    await self._drain(chunks)
                if outcome is not None:
                    return outcome

    async def _drain(self, chunks: AsyncIterator[bytes]) -> None:
        """Read the upstream body to its end after the client's has ended (its last chunk follows
        [DONE] at once), so that the connection serves another request instead of being closed; a
        body that goes on is cut."""
        with contextlib.suppress(*_UPSTREAM_ERRORS, TimeoutError):
            async with asyncio.timeout(_DRAIN_S):
                while await self._read(chunks):
                    pass

    async def _on_event(self, raw: bytes, gen: int) -> _Done | None:
        data = event_data(raw)
        if data is None:  # a comment / keep-alive
            await self.out.body(raw)
            return None
        if data.strip() == "[DONE]":
            await self._flush_held()
            await self.out.end(DONE_EVENT)
            return "done"
        obj: Any = None
        with contextlib.suppress(ValueError):
            obj = json.loads(data)
        if isinstance(obj, dict) and "error" in obj and self._restart_caused(gen):
            return "interrupted"  # e.g. vLLM's EngineDeadError event while the watchdog stops it
        echo = bool(self.stream.echo_guard)
        self.stream.strip_echo(obj)
        self.stream.observe(obj)
        if isinstance(obj, dict) and (self.stream.continuing or self.hide_ids or echo):
            if self.stream.continuing:
                self.stream.rewrite(obj)
            if self.hide_ids:
                hide_ids(obj)
            raw = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        if not self.stream.committed and not carries_token(obj):
            self.stream.held.append(raw)
            return None
        self.stream.committed = True
        await self._flush_held()
        await self.out.body(raw)
        return None

    async def _flush_held(self) -> None:
        held, self.stream.held = self.stream.held, []
        await self.out.body(b"".join(held))

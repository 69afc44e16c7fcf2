"""An OpenAI-compatible reverse proxy whose requests survive a watchdog-initiated server restart.

Clients talk to the proxy; the proxy forwards every request (any method, path, body and header but
the hop-by-hop ones) to the server at ``gate.base_url`` and streams the answer back chunk by chunk.
The supervisor drives an :class:`UpstreamGate`: ``going_down()`` before it stops the server on
purpose, ``up()`` once the new server's ``/health`` answered, ``gave_up()`` when no restart is
coming.

**Interrupted by a watchdog restart.** An upstream failure (connection refused or reset, EOF in the
middle of a body, a 5xx status, a ``data: {"error": ...}`` event or a stream that ends without
``[DONE]``) counts as caused by a watchdog restart only when ``going_down()`` was called after the
attempt started (its generation changed) or the gate is not up at the time of the failure. Then
the proxy waits for ``up()`` (at most ``resume_timeout_s``) and

* re-submits a request whose answer has not reached the client yet: every non-streaming request
  (its body is held back until complete, up to ``BUFFER_LIMIT`` bytes) and every stream before its
  first token (events carrying no token, e.g. chat's role-only first chunk, are held back until
  the first token so that a re-submission does not repeat them);
* continues a ``/v1/completions`` stream that is already mid-way: the request is sent again with
  the text streamed so far appended to its (string) prompt and ``max_tokens`` (and ``min_tokens``)
  reduced by the number of tokens already streamed; the new stream's chunks reach the same client
  connection with the original ``id``/``created`` (and ``usage`` shifted to cover the whole
  completion), so the client sees one uninterrupted stream ending with a single ``[DONE]``.
  If ``max_tokens`` is used up or the choice already has its ``finish_reason``, the stream is just
  finished. Each completion stream is forwarded with ``return_token_ids`` (vLLM then puts the
  prompt's token ids in the first chunk and each chunk's token ids in it; the proxy takes them out
  again unless the client asked for them): where every token's id came back, the continuation's
  prompt is the prompt's ids plus the streamed ids, exact under greedy decoding whatever the
  tokenizer (text re-tokenized after a byte-level BPE's partial characters is not the same tokens).
  Without ids it is the text rule, exact for an engine whose next token is a function of the whole
  text before it (the demo engine); with sampling either is a valid continuation, not the same one;
* fails every other stream that is already mid-way (chat completions, ``n``/``best_of`` > 1,
  list or token prompts, ``logprobs``/``echo``/``prompt_logprobs``, beam search, unknown paths)
  with one SSE event ``data: {"error": {..., "type": "watchdog_restart", "code": 503}}`` followed by
  ``data: [DONE]``, at once (no wait), never a silent truncation;
* answers ``503`` (JSON ``{"error": {...}}``, or the SSE error event when the stream's headers are
  out already) when the gate gave up, or did not come up within ``resume_timeout_s``.

**Token count** of a mid-way completion stream (what ``max_tokens`` is reduced by): the token ids a
chunk carries, else each chunk with a non-empty ``choices[0].text`` counts one token, except that a
chunk carrying ``usage`` with
``completion_tokens`` (``stream_options.continuous_usage_stats``) sets the count to that exact
value. One chunk per token is what vLLM streams by default; an engine that packs several tokens
into one chunk without usage makes the continuation's budget slightly too large.

At most one re-submission per restart generation: an attempt that fails while the gate is up and
its generation unchanged is not a restart's doing and is passed through as-is (a ``502`` JSON error
when the upstream connection failed before an answer, or the client connection is closed without
completing the body, exactly like the upstream's did). A client that disconnects cancels its
upstream request: the upstream connection is shut down at once.

A request that arrives while the gate is down waits for ``up()`` like a resumed one. The gate
starts up: a supervisor that wants requests to wait for the very first server calls
``going_down()`` before starting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = ["BUFFER_LIMIT", "ResumingProxy", "UpstreamGate", "continuation_request"]

GateState = Literal["up", "down", "gave_up"]

BUFFER_LIMIT = 4 * 1024 * 1024
"""A non-SSE answer is held back (so it can be re-submitted) up to this size, then streamed."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) ``max_tokens`` for ``/v1/completions`` when the request leaves it out."""
CONNECT_TIMEOUT_S = 10.0
_WAIT_SLICE_S = 0.5
_READ_SIZE = 64 * 1024

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_UPSTREAM_ERRORS = (OSError, http.client.HTTPException)
_RESTART_TYPE = "watchdog_restart"
_GAVE_UP_TYPE = "watchdog_gave_up"
_DONE_EVENT = b"data: [DONE]\n\n"

T = TypeVar("T")


class UpstreamGate:
    """Where the server is and whether it is up; thread-safe. Driven by the supervisor."""

    def __init__(self, base_url: str) -> None:
        self._cond = threading.Condition()
        self._base_url = base_url.rstrip("/")
        self._state: GateState = "up"
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []

    @property
    def base_url(self) -> str:
        with self._cond:
            return self._base_url

    def set_base_url(self, url: str) -> None:
        with self._cond:
            self._base_url = url.rstrip("/")

    @property
    def generation(self) -> int:
        """Incremented by every :meth:`going_down`."""
        with self._cond:
            return self._generation

    @property
    def state(self) -> GateState:
        with self._cond:
            return self._state

    def snapshot(self) -> tuple[int, GateState, str]:
        """``(generation, state, base_url)``, read together."""
        with self._cond:
            return self._generation, self._state, self._base_url

    def going_down(self) -> None:
        """The supervisor is about to stop the server on purpose (a restart)."""
        with self._cond:
            self._generation += 1
            self._state = "down"
            self._cond.notify_all()

    def up(self) -> None:
        """The server is ready again (its ``/health`` answered)."""
        self._set("up")

    def gave_up(self) -> None:
        """No restart is coming: requests waiting for one fail with a clear error."""
        self._set("gave_up")

    def wait_up(self, timeout_s: float) -> bool:
        """Wait until the gate is up; False on timeout or when the supervisor gave up."""
        with self._cond:
            self._cond.wait_for(lambda: self._state != "down", timeout=max(0.0, timeout_s))
            return self._state == "up"

    def _set(self, state: GateState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _add_listener(self, listener: Callable[[], None]) -> None:
        """Called (in the caller's thread) after every ``up()`` / ``gave_up()``."""
        with self._cond:
            self._listeners.append(listener)

    def _remove_listener(self, listener: Callable[[], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)


# --------------------------------------------------------------------------------------------------
# continuation of a /v1/completions stream


def continuation_request(
    body: Any, streamed_text: str, streamed_tokens: int, token_ids: list[int] | None = None
) -> dict[str, Any] | str:
    """The ``/v1/completions`` request that continues ``body`` after ``streamed_text``.

    With ``token_ids`` (the prompt's token ids and every token streamed so far, as vLLM returns them
    with ``return_token_ids``) the continuation's prompt is those ids: exact whatever the tokenizer
    (text re-tokenized after a byte-level BPE's partial characters is not the same tokens). Returns the
    new JSON body, or the reason why the stream cannot be resumed safely. A body whose ``max_tokens``
    is used up comes back with ``max_tokens`` <= 0: the caller just finishes.
    """
    if not isinstance(body, dict):
        return "the request body is not a JSON object"
    prompt = body.get("prompt")
    if token_ids is None and not isinstance(prompt, str):
        return "only a single string prompt can be continued"
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and value != 1:
            return f"{key}={value!r}: several choices cannot be continued"
    if body.get("echo"):
        return "echo=true cannot be continued"
    for key in ("logprobs", "prompt_logprobs"):
        if body.get(key) is not None:
            return f"{key} cannot be continued"
    if body.get("use_beam_search"):
        return "beam search cannot be continued"
    max_tokens = body.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        return f"max_tokens={max_tokens!r} is not an integer"
    new = dict(body)
    if token_ids is not None:
        new["prompt"] = list(token_ids)
    else:
        assert isinstance(prompt, str)
        new["prompt"] = prompt + streamed_text
    if max_tokens is not None:
        new["max_tokens"] = max_tokens - streamed_tokens
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens > 0:
        new["min_tokens"] = max(0, min_tokens - streamed_tokens)
    return new


# --------------------------------------------------------------------------------------------------
# the upstream side: stdlib http.client, blocking calls run in the proxy's thread pool


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    prefix: str
    netloc: str

    @staticmethod
    def parse(base_url: str) -> _Target:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base_url must be http(s)://host[:port][/prefix], got {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return _Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), parts.netloc)


class _Upstream:
    """One upstream exchange. ``abort()`` may be called from any thread at any time."""

    def __init__(self, target: _Target, generation: int) -> None:
        self.target = target
        self.generation = generation
        self._lock = threading.Lock()  # guards _sock / _aborted
        self._op = threading.Lock()  # held by the blocking call in progress, and by close()
        self._sock: socket.socket | None = None
        self._aborted = False
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None

    def open(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]]]:
        with self._op:
            t = self.target
            sock = socket.create_connection((t.host, t.port), timeout=CONNECT_TIMEOUT_S)
            with self._lock:
                if self._aborted:
                    sock.close()
                    raise ConnectionAbortedError("upstream exchange aborted")
                self._sock = sock
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn: http.client.HTTPConnection
            if t.scheme == "https":
                context = ssl.create_default_context()
                conn = http.client.HTTPSConnection(t.host, t.port, context=context)
                wrapped = context.wrap_socket(sock, server_hostname=t.host)  # takes over sock's descriptor
                with self._lock:
                    self._sock = wrapped
                conn.sock = wrapped
            else:
                conn = http.client.HTTPConnection(t.host, t.port)
                conn.sock = sock
            self._conn = conn
            conn.putrequest(method, t.prefix + target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", t.netloc)
            for name, value in headers:
                conn.putheader(name, value)
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            self._resp = resp
            return resp.status, resp.getheaders()

    def read(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end; raises on a truncated body."""
        with self._op:
            resp = self._resp
            if resp is None:
                raise ConnectionAbortedError("upstream exchange not open")
            data = resp.read1(_READ_SIZE)
            if not data and resp.length:  # EOF before Content-Length bytes (chunked raises itself)
                raise http.client.IncompleteRead(b"", resp.length)
            if not data and self._aborted:
                raise ConnectionAbortedError("upstream exchange aborted")
            return data

    def abort(self) -> None:
        """Shut the connection down: a blocked call returns at once, the server sees a disconnect."""
        with self._lock:
            self._aborted = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Release the connection; waits for a blocked call (call ``abort()`` first to unblock it)."""
        with self._op:
            if self._resp is not None:
                self._resp.close()
            if self._conn is not None:
                self._conn.close()
            with self._lock:
                sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()


# --------------------------------------------------------------------------------------------------
# the client side


class _ClientOut:
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


def _error_event(message: str, type_: str, code: int = 503) -> bytes:
    payload = json.dumps({"error": {"message": message, "type": type_, "code": code}}, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


def _forward_headers(headers: Iterable[tuple[str, str]], *, identity: bool) -> list[tuple[str, str]]:
    """Request or response headers minus hop-by-hop ones (and those named by Connection)."""
    headers = list(headers)
    drop = set(_HOP_BY_HOP) | {"host", "content-length"}
    for name, value in headers:
        if name.lower() == "connection":
            drop.update(tok.strip().lower() for tok in value.split(","))
    if identity:
        drop.add("accept-encoding")
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    if identity:
        out.append(("Accept-Encoding", "identity"))
    return out


def _header(headers: Iterable[tuple[str, str]], name: str) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v
    return ""


def _split_events(buf: bytearray) -> list[bytes]:
    """Pop the complete SSE events (each with its terminating blank line) off ``buf``."""
    events: list[bytes] = []
    while True:
        lf = buf.find(b"\n\n")
        crlf = buf.find(b"\r\n\r\n")
        found = [(i, n) for i, n in ((lf, 2), (crlf, 4)) if i >= 0]
        if not found:
            return events
        i, n = min(found)
        events.append(bytes(buf[: i + n]))
        del buf[: i + n]


def _event_data(raw: bytes) -> str | None:
    """The joined ``data:`` lines of one event, or None for an event without any (a comment)."""
    lines = [line[5:].removeprefix(b" ") for line in raw.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines).decode("utf-8", errors="replace")


def _carries_token(obj: Any) -> bool:
    """False for a chunk that carries no generated token yet (e.g. chat's role-only first chunk)."""
    if not isinstance(obj, dict) or "error" in obj or obj.get("usage"):
        return True
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        return True
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return True
        if choice.get("text") or choice.get("logprobs") or choice.get("token_ids"):
            return True
        delta = choice.get("delta")
        if delta is not None:
            if not isinstance(delta, dict):
                return True
            if any(v not in (None, "", []) for k, v in delta.items() if k != "role"):
                return True
    return False


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _hide_ids(obj: dict[str, Any]) -> None:
    """Take back the token ids the proxy asked for and the client did not (vLLM's own null)."""
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            for key in ("token_ids", "prompt_token_ids"):
                if choice.get(key) is not None:
                    choice[key] = None


@dataclass
class _Stream:
    """What the client has been sent of one SSE stream."""

    committed: bool = False  # a token-carrying event reached the client
    held: list[bytes] = field(default_factory=list)  # events before the first token, held back
    text: list[str] = field(default_factory=list)  # choices[0].text sent so far
    tokens: int = 0  # tokens sent before the current attempt (continuations)
    attempt_tokens: int = 0  # tokens of the current attempt
    finished: bool = False  # choices[0].finish_reason seen
    orig_id: Any = None
    orig_created: Any = None
    continuing: bool = False  # the current attempt continues a mid-way stream: rewrite its chunks
    prompt_ids: list[int] | None = None  # the prompt's token ids, if the server returned them
    ids: list[int] = field(default_factory=list)  # token ids streamed so far (all attempts)
    ids_complete: bool = True  # every token-carrying chunk came with its token ids
    # Texts a token-id continuation's first chunk may start with, to be taken off: vLLM primes its
    # detokenizer (tokenizers' DecodeStream) with the prompt's ids, and where those end inside a
    # character its first delta can hold the whole decoded prompt.
    echo_guard: tuple[str, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.tokens + self.attempt_tokens

    def observe(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if self.orig_id is None and "id" in obj:
            self.orig_id, self.orig_created = obj.get("id"), obj.get("created")
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        usage = obj.get("usage")
        if isinstance(choice, dict):
            text = choice.get("text")
            ids = choice.get("token_ids")
            prompt_ids = choice.get("prompt_token_ids")
            if self.prompt_ids is None and isinstance(prompt_ids, list) and _int_list(prompt_ids):
                self.prompt_ids = list(prompt_ids)
            if isinstance(text, str) and text:
                self.text.append(text)
            if isinstance(ids, list) and _int_list(ids):
                self.ids.extend(ids)
                self.attempt_tokens += len(ids)  # exact, even for a token that decodes to no text yet
            elif isinstance(text, str) and text:
                self.ids_complete = False
                self.attempt_tokens += 1
            if choice.get("finish_reason") is not None:
                self.finished = True
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.attempt_tokens = usage["completion_tokens"]

    def rewrite(self, obj: dict[str, Any]) -> None:
        """Make a continuation's chunk look like part of the original stream."""
        if "id" in obj and self.orig_id is not None:
            obj["id"] = self.orig_id
        if "created" in obj and self.orig_created is not None:
            obj["created"] = self.orig_created
        usage = obj.get("usage")
        if isinstance(usage, dict):
            offset = self.tokens
            if isinstance(usage.get("completion_tokens"), int):
                usage["completion_tokens"] += offset
            if isinstance(usage.get("prompt_tokens"), int):  # the prompt grew by the streamed text
                usage["prompt_tokens"] = max(0, usage["prompt_tokens"] - offset)

    def token_prompt(self) -> list[int] | None:
        """The prompt that continues this stream token for token, if every token's id is known."""
        if self.prompt_ids is None or not self.ids_complete:
            return None
        return self.prompt_ids + self.ids

    def begin_continuation(self, echo_guard: tuple[str, ...] = ()) -> None:
        self.tokens += self.attempt_tokens
        self.attempt_tokens = 0
        self.continuing = True
        self.echo_guard = tuple(g for g in echo_guard if g)

    def strip_echo(self, obj: Any) -> None:
        """Take an echoed prompt off a continuation's first chunk with text (then stop looking). Chunks
        before it may carry token ids and no text: the detokenizer holds back a token that ends inside
        a character, and then sends it with the next one, the echo in front."""
        if not self.echo_guard or not isinstance(obj, dict):
            return
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return
        text = choice.get("text")
        if not isinstance(text, str) or not text:
            return
        for g in sorted(self.echo_guard, key=len, reverse=True):
            if text.startswith(g):
                choice["text"] = text[len(g) :]
                break
        self.echo_guard = ()


_Done = Literal["done", "interrupted"]


class _Exchange:
    """One client request, through as many upstream attempts as restarts require."""

    def __init__(
        self,
        proxy: ResumingProxy,
        method: str,
        target: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        send: Send,
    ) -> None:
        self.proxy = proxy
        self.gate = proxy.gate
        self.method = method
        self.target = target
        self.path = path
        self.body = body
        self.out = _ClientOut(send)
        self.json: Any = None
        if body[:1] == b"{":
            with contextlib.suppress(ValueError):
                self.json = json.loads(body)
        self.streaming = isinstance(self.json, dict) and self.json.get("stream") is True
        self.headers = _forward_headers(headers, identity=self.streaming)
        self.stream = _Stream()
        # A completion stream asks vLLM for its token ids (return_token_ids), so that a continuation
        # can be sent as token ids; the client gets them only if it asked.
        self.hide_ids = False
        if self.streaming and path == "/v1/completions" and not self.json.get("return_token_ids"):
            self.hide_ids = True
            self.body = json.dumps({**self.json, "return_token_ids": True}).encode()

    # ---- the loop over attempts

    async def run(self) -> None:
        body = self.body
        first = True
        while True:
            if not await self._wait_up():
                return
            gen, state, base_url = self.gate.snapshot()
            if state != "up":  # went down again since: wait for that restart too
                continue
            if first:
                self.proxy._count("forwarded")
                first = False
            outcome = await self._attempt(_Target.parse(base_url), gen, body)
            if outcome == "done":
                return
            # interrupted by a watchdog restart
            if self.out.started and self.stream.committed:
                if self.stream.finished:
                    await self.out.end(_DONE_EVENT)
                    return
                cont: dict[str, Any] | str
                if self.path == "/v1/completions":
                    cont = continuation_request(
                        {**self.json, "return_token_ids": True} if self.hide_ids else self.json,
                        "".join(self.stream.text),
                        self.stream.total_tokens,
                        self.stream.token_prompt(),
                    )
                else:
                    cont = "only a /v1/completions stream can be continued"
                if isinstance(cont, str):
                    self.proxy._count("failed_unresumable")
                    message = (
                        f"the stream was interrupted by a watchdog restart and cannot be resumed safely ({cont}); "
                        "re-send the request"
                    )
                    await self.out.end(_error_event(message, _RESTART_TYPE) + _DONE_EVENT)
                    return
                if cont.get("max_tokens") is not None and cont["max_tokens"] <= 0:
                    await self.out.end(_DONE_EVENT)
                    return
                if not await self._wait_up():
                    return
                streamed = "".join(self.stream.text)
                guard: tuple[str, ...] = ()
                if isinstance(cont.get("prompt"), list):  # continued by token ids
                    prompt = self.json.get("prompt") if isinstance(self.json, dict) else None
                    guard = (prompt + streamed,) if isinstance(prompt, str) else ()
                self.stream.begin_continuation(guard)
                body = json.dumps(cont).encode()
                self.proxy._count("resumed_mid_stream")
            else:
                if not await self._wait_up():
                    return
                self.stream = _Stream()
                body = self.body
                self.proxy._count("resubmitted")

    async def _wait_up(self) -> bool:
        """Wait for the gate (bounded by resume_timeout_s); on failure answer the client and return False."""
        deadline = time.monotonic() + self.proxy.resume_timeout_s
        while True:
            state = self.gate.state
            if state == "up":
                return True
            remaining = deadline - time.monotonic()
            if state == "gave_up":
                message = "the server was stopped by the watchdog and no restart is coming (the supervisor gave up)"
                type_ = _GAVE_UP_TYPE
            elif self.proxy._stopping.is_set():
                message = "the proxy is shutting down while the server restarts"
                type_ = _RESTART_TYPE
            elif remaining <= 0:
                message = (
                    f"the server is restarting (watchdog) and did not come back within "
                    f"{self.proxy.resume_timeout_s:g} s"
                )
                type_ = _RESTART_TYPE
            else:
                await self.proxy._call(self.gate.wait_up, min(_WAIT_SLICE_S, remaining))
                continue
            self.proxy._count("failed_unresumable")
            if self.out.started:
                await self.out.end(_error_event(message, type_) + _DONE_EVENT)
            else:
                await self.out.json_error(503, message, type_)
            return False

    def _restart_caused(self, gen: int) -> bool:
        now_gen, state, _ = self.gate.snapshot()
        return now_gen != gen or state != "up"

    # ---- one attempt

    async def _attempt(self, target: _Target, gen: int, body: bytes) -> _Done:
        up = _Upstream(target, gen)
        self.proxy._track(up)
        try:
            try:
                status, headers = await self.proxy._call(up.open, self.method, self.target, self.headers, body)
            except _UPSTREAM_ERRORS as exc:
                if self._restart_caused(gen):
                    return "interrupted"
                await self._upstream_failed(f"upstream connection failed: {exc!r}")
                return "done"
            if status >= 500 and self._restart_caused(gen):
                return "interrupted"
            headers = _forward_headers(headers, identity=False)
            if status == 200 and _header(headers, "content-type").startswith("text/event-stream"):
                return await self._pump_sse(up, gen, headers)
            if self.out.started:  # a re-submitted stream got no stream back
                return await self._stream_got_plain(up, gen, status)
            return await self._pump_plain(up, gen, status, headers)
        finally:
            self.proxy._untrack(up)
            up.abort()
            self.proxy._close_later(up)

    async def _upstream_failed(self, message: str) -> None:
        """A failure that is not a restart's: pass it through as well as the client's state allows."""
        if not self.out.started:
            await self.out.json_error(502, message, "upstream_error")
        # else: return without ending the body; the client connection is closed mid-body, as the
        # upstream's was (a truncated chunked body, never a clean end)

    async def _pump_plain(self, up: _Upstream, gen: int, status: int, headers: list[tuple[str, str]]) -> _Done:
        buf = bytearray()
        while True:
            try:
                data = await self.proxy._call(up.read)
            except _UPSTREAM_ERRORS as exc:
                if not self.out.started:
                    if self._restart_caused(gen):
                        return "interrupted"
                    await self._upstream_failed(f"upstream connection failed mid-body: {exc!r}")
                elif self._restart_caused(gen):
                    self.proxy._count("failed_unresumable")  # too big to have been held back
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

    async def _stream_got_plain(self, up: _Upstream, gen: int, status: int) -> _Done:
        buf = bytearray()
        while len(buf) <= BUFFER_LIMIT:
            try:
                data = await self.proxy._call(up.read)
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
        self.proxy._count("failed_unresumable")
        await self.out.end(_error_event(message, _RESTART_TYPE, status) + _DONE_EVENT)
        return "done"

    async def _pump_sse(self, up: _Upstream, gen: int, headers: list[tuple[str, str]]) -> _Done:
        if not self.out.started:
            await self.out.start(200, headers)
        buf = bytearray()
        while True:
            try:
                data = await self.proxy._call(up.read)
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
            for raw in _split_events(buf):
                outcome = await self._on_event(raw, gen)
                if outcome is not None:
                    return outcome

    async def _on_event(self, raw: bytes, gen: int) -> _Done | None:
        data = _event_data(raw)
        if data is None:  # a comment / keep-alive
            await self.out.body(raw)
            return None
        if data.strip() == "[DONE]":
            await self._flush_held()
            await self.out.end(_DONE_EVENT)
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
                _hide_ids(obj)
            raw = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        if not self.stream.committed and not _carries_token(obj):
            self.stream.held.append(raw)
            return None
        self.stream.committed = True
        await self._flush_held()
        await self.out.body(raw)
        return None

    async def _flush_held(self) -> None:
        held, self.stream.held = self.stream.held, []
        await self.out.body(b"".join(held))


class _ProxyResponse(Response):
    """Runs one :class:`_Exchange` with full control over ``send``; a client disconnect cancels it."""

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
        exchange = _Exchange(self._proxy, req.method, target, req.url.path, headers, self._body, send)
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
                    self._proxy._count("client_cancelled")
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


_STAT_KEYS = ("forwarded", "resubmitted", "resumed_mid_stream", "failed_unresumable", "client_cancelled")


class ResumingProxy:
    """The reverse proxy (uvicorn + FastAPI in a background thread).

    ``stats``: ``forwarded`` client requests sent upstream, ``resubmitted`` transparent
    re-submissions (nothing of the answer had reached the client), ``resumed_mid_stream``
    continuations of a mid-way completion stream, ``failed_unresumable`` requests failed because of
    a restart (unresumable stream, gave up, timed out), ``client_cancelled`` client disconnects
    before the answer was complete (their upstream request is cancelled).
    """

    def __init__(
        self, gate: UpstreamGate, host: str = "127.0.0.1", port: int = 0, *, resume_timeout_s: float = 600.0
    ) -> None:
        self.gate = gate
        self.host = host
        self.port = port
        self.resume_timeout_s = resume_timeout_s
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        self._live: set[_Upstream] = set()
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.app = self._make_app()

    @property
    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    def _make_app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

        @app.api_route("/{path:path}", methods=methods, include_in_schema=False)
        async def proxy(request: Request) -> Response:
            return _ProxyResponse(self, request, await request.body())

        return app

    def start(self) -> None:
        """Serve in a background thread; returns once listening (``port`` is then the bound port)."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        self._pool = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="proxy-upstream")
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
        self.gate._add_listener(self._on_gate_change)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="resuming-proxy", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the resuming proxy failed to start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving; in-flight requests end (a waiting one gets a 503). Idempotent."""
        self._stopping.set()
        self.gate._remove_listener(self._on_gate_change)
        if self._server is not None:
            self._server.should_exit = True
        with self._live_lock:
            live = list(self._live)
        for up in live:
            up.abort()
        if self._thread is not None:
            self._thread.join(timeout=15.0)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = None

    # ---- helpers for _Exchange

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._pool
        if pool is None:
            raise ConnectionAbortedError("proxy stopped")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _track(self, up: _Upstream) -> None:
        with self._live_lock:
            self._live.add(up)

    def _untrack(self, up: _Upstream) -> None:
        with self._live_lock:
            self._live.discard(up)

    def _close_later(self, up: _Upstream) -> None:
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError
            pool.submit(up.close)
        except RuntimeError:  # pool shut down: the blocked call (if any) was aborted already
            up.close()

    def _on_gate_change(self) -> None:
        """After up()/gave_up() the old server is gone: fail its connections that still look alive."""
        gen = self.gate.generation
        with self._live_lock:
            stale = [up for up in self._live if up.generation < gen]
        for up in stale:
            up.abort()

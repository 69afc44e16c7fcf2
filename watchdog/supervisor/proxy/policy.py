"""The resume policy: what to send after a watchdog restart interrupted an answer, and what the client
has been sent so far. Pure: no I/O, no clock; the exchange loop (``exchange.py``) asks, then acts.

**Token count** of a mid-way completion stream (what ``max_tokens`` is reduced by): the token ids a
chunk carries, else each chunk with a non-empty ``choices[0].text`` counts one token, except that a
chunk carrying ``usage`` with ``completion_tokens`` (``stream_options.continuous_usage_stats``) sets
the count to that exact value. One chunk per token is what vLLM streams by default; an engine that
packs several tokens into one chunk without usage makes the continuation's budget slightly too large.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "Resume",
    "StreamState",
    "continuation_request",
    "forward_headers",
    "header",
    "hide_ids",
    "plan_resume",
]

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) ``max_tokens`` for ``/v1/completions`` when the request leaves it out."""

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


def forward_headers(headers: Iterable[tuple[str, str]], *, identity: bool) -> list[tuple[str, str]]:
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


def header(headers: Iterable[tuple[str, str]], name: str) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v
    return ""


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def hide_ids(obj: dict[str, Any]) -> None:
    """Take back the token ids the proxy asked for and the client did not (vLLM's own null)."""
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            for key in ("token_ids", "prompt_token_ids"):
                if choice.get(key) is not None:
                    choice[key] = None


@dataclass
class StreamState:
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
        """Take an echoed prompt off a continuation's first chunk with text (then stop looking).

        Chunks before it whose tokens decode to no text yet (the continuation starts inside a
        character) keep the guard: the echo comes with the first text the detokenizer releases."""
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


@dataclass(frozen=True)
class Resume:
    """What to do after an attempt was interrupted by a watchdog restart.

    ``finish``: end the stream with ``[DONE]`` (nothing is left to generate); ``fail``: end it with
    an error event saying ``message``; ``continue``: send ``body`` to continue a mid-way stream (the
    stream state's ``begin_continuation(guard)`` first); ``resubmit``: send ``body`` again from
    scratch (nothing of the answer reached the client).
    """

    kind: Literal["finish", "fail", "continue", "resubmit"]
    body: bytes = b""
    message: str = ""
    guard: tuple[str, ...] = ()


def plan_resume(stream: StreamState, *, started: bool, path: str, request: Any, body: bytes, ask_ids: bool) -> Resume:
    """The next step for one interrupted exchange; ``request`` is the client's JSON body (or None),
    ``body`` what was sent for it, ``ask_ids`` whether the proxy added ``return_token_ids``."""
    if not (started and stream.committed):
        return Resume("resubmit", body)
    if stream.finished:
        return Resume("finish")
    cont: dict[str, Any] | str
    if path == "/v1/completions":
        cont = continuation_request(
            {**request, "return_token_ids": True} if ask_ids else request,
            "".join(stream.text),
            stream.total_tokens,
            stream.token_prompt(),
        )
    else:
        cont = "only a /v1/completions stream can be continued"
    if isinstance(cont, str):
        message = (
            f"the stream was interrupted by a watchdog restart and cannot be resumed safely ({cont}); "
            "re-send the request"
        )
        return Resume("fail", message=message)
    if cont.get("max_tokens") is not None and cont["max_tokens"] <= 0:
        return Resume("finish")
    guard: tuple[str, ...] = ()
    if isinstance(cont.get("prompt"), list):  # continued by token ids
        prompt = request.get("prompt") if isinstance(request, dict) else None
        guard = (prompt + "".join(stream.text),) if isinstance(prompt, str) else ()
    return Resume("continue", json.dumps(cont).encode(), guard=guard)

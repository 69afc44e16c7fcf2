"""Server-sent events as the OpenAI API streams them: framing, data, and the proxy's own events."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE_EVENT", "carries_token", "error_event", "event_data", "split_events"]

DONE_EVENT = b"data: [DONE]\n\n"


def error_event(message: str, type_: str, code: int = 503) -> bytes:
    payload = json.dumps({"error": {"message": message, "type": type_, "code": code}}, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


def split_events(buf: bytearray) -> list[bytes]:
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


def event_data(raw: bytes) -> str | None:
    """The joined ``data:`` lines of one event, or None for an event without any (a comment)."""
    lines = [line[5:].removeprefix(b" ") for line in raw.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines).decode("utf-8", errors="replace")


def carries_token(obj: Any) -> bool:
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

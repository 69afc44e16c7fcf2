"""An OpenAI-compatible reverse proxy whose requests survive a watchdog-initiated server restart.

Split in four: ``gate`` (the supervisor's side: where the server is and whether it is up),
``policy`` and ``sse`` (pure: what to send after an interruption, SSE framing, token accounting),
``exchange`` and ``upstream`` (the loop over upstream attempts through one httpx transport;
cancelling a stale attempt is task cancellation; ``pool``: the default transport, connections kept
between requests) and ``app`` (the uvicorn server, its ASGI application, a pool per server
generation).


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

**Token count**: see :mod:`.policy`.

At most one re-submission per restart generation: an attempt that fails while the gate is up and
its generation unchanged is not a restart's doing and is passed through as-is (a ``502`` JSON error
when the upstream connection failed before an answer, or the client connection is closed without
completing the body, exactly like the upstream's did). A client that disconnects cancels its
upstream request: the upstream connection is shut down at once.

A request that arrives while the gate is down waits for ``up()`` like a resumed one. The gate
starts up: a supervisor that wants requests to wait for the very first server calls
``going_down()`` before starting it.
"""

from .app import CONNECT_TIMEOUT_S, ResumingProxy
from .exchange import BUFFER_LIMIT
from .gate import GateState, UpstreamGate
from .policy import DEFAULT_COMPLETION_MAX_TOKENS, continuation_request

__all__ = [
    "BUFFER_LIMIT",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "GateState",
    "ResumingProxy",
    "UpstreamGate",
    "continuation_request",
]

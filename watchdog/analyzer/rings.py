"""What the flags of vLLM's shm rings say about a stalled engine <-> workers exchange. Pure.

The agent reads the flags from outside (``watchdog.evidence.rings.inspect_ring``); this names the
reader that did not read, the writer that found no free block (vLLM's "No available shared memory
broadcast block found" on the writer side) and the worker that read but never replied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from watchdog.types import RingState, RingVerdict


def describe(state: RingState) -> str:
    """One line, e.g. ``broadcast psm_ab12: 3 chunks written; reader 2 has 3 unread, readers 0,1 caught up``."""
    written = sum(1 for c in state.chunks if c.written)
    lagging = [r for r in range(state.n_readers) if state.unread_by(r)]
    caught_up = [str(r) for r in range(state.n_readers) if r not in lagging]
    readers = [f"reader {r} has {state.unread_by(r)} unread" for r in lagging]
    if caught_up:
        readers.append(f"reader{'s' if len(caught_up) > 1 else ''} {','.join(caught_up)} caught up")
    chunks = "chunk" if written == 1 else "chunks"
    return f"{state.role} {state.name}: {written} {chunks} written; {', '.join(readers)}"


def classify(broadcast: RingState | None, responses: Mapping[int, RingState]) -> RingVerdict:
    """The ``RingVerdict`` for one deployment's broadcast ring and its response rings (rank -> ring)."""
    unread_replies = tuple(sorted(r for r, st in responses.items() if st.n_readers >= 1 and st.unread_by(0)))
    if broadcast is None:
        return RingVerdict("no_broadcast", (), unread_replies, "the broadcast ring could not be read")
    written = sum(1 for c in broadcast.chunks if c.written)
    if written == 0:
        return RingVerdict("idle", (), unread_replies, f"broadcast {broadcast.name}: nothing broadcast yet")
    unread = {r: broadcast.unread_by(r) for r in range(broadcast.n_readers)}
    behind = tuple(r for r, n in unread.items() if n)
    full = len(broadcast.chunks)
    blocking = tuple(r for r in behind if unread[r] == full)
    if blocking:
        names = ", ".join(map(str, blocking))
        return RingVerdict(
            "broadcast_full",
            blocking,
            unread_replies,
            f"broadcast {broadcast.name}: all {full} chunks written and unread by reader {names}: "
            "the engine has no free block to write (reader stopped reading)",
        )
    if behind:
        parts = ", ".join(f"reader {r} ({unread[r]} unread)" for r in behind)
        return RingVerdict(
            "reader_behind",
            behind,
            unread_replies,
            f"broadcast {broadcast.name}: {parts} did not read what the other readers read",
        )
    if unread_replies:
        ranks = ", ".join(map(str, unread_replies))
        return RingVerdict(
            "reply_unread",
            (),
            unread_replies,
            f"every reader took every broadcast; replies from rank {ranks} wait unread by the engine",
        )
    return RingVerdict(
        "awaiting_reply",
        (),
        (),
        f"broadcast {broadcast.name}: every reader took every broadcast and no reply is waiting: "
        "a worker read its request and has not replied",
    )


def ring_verdict(rings: Sequence[RingState]) -> RingVerdict | None:
    """``classify`` for a snapshot's rings (the broadcast ring, then the response rings in rank order);
    None when the snapshot holds no ring at all (post-mortem, another node's engine)."""
    if not rings:
        return None
    broadcast = next((r for r in rings if r.role == "broadcast"), None)
    responses = dict(enumerate(r for r in rings if r.role == "response"))
    return classify(broadcast, responses)

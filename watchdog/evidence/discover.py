"""Find vLLM's shm rings from outside: which ``/dev/shm`` segments are rings, their layout, role and owners.

A ``ShmRingBuffer`` segment carries no header, so a ring is recognised by three things:

* Size. It is exactly ``max_chunks * (max_chunk_bytes + 1 + n_readers)`` bytes. For each candidate
  ``(max_chunks, max_chunk_bytes)`` the reader count ``(size - C*B) / C - 1`` must be a whole number
  in 1..512. The defaults (checked against vLLM's source):

  - ``MessageQueue(n_reader, n_local_reader, max_chunk_bytes=..., max_chunks=10)`` in
    vllm/distributed/device_communicators/shm_broadcast.py: ``max_chunk_bytes`` defaulted to
    ``1024 * 1024 * 10`` (10 MiB) and later to ``1024 * 1024 * 24`` (24 MiB, "large enough to
    accommodate grammar bitmask tensors for large batches"). Each worker's response ring,
    ``worker_response_mq = MessageQueue(1, 1)`` in vllm/v1/executor/multiproc_executor.py, uses
    that default: 1 reader, the engine.
  - the engine's ``rpc_broadcast_mq = MessageQueue(world_size, local_world_size (older: world_size),
    max_chunk_bytes=envs.VLLM_MQ_MAX_CHUNK_BYTES_MB * 1024 * 1024)``; vllm/envs.py defaults
    ``VLLM_MQ_MAX_CHUNK_BYTES_MB`` to 16. Its readers are the node's local workers.
  - the demo engine (watchdog.demo.engine.EngineArgs): 10 chunks of 64 KiB.

  With ``generic=True`` a size no candidate explains may still be taken as 10 chunks of any multiple
  of 1 KiB (a changed ``VLLM_MQ_MAX_CHUNK_BYTES_MB``), but only when the owner count confirms it.
* Flags. Every metadata byte is 0 or 1 (``inspect_ring`` checks). A wrong layout usually reads data
  bytes as flags and fails; with several layouts left, the one with ``n_readers + 1`` owners (the
  writer and each reader map it) wins. Still ambiguous, or nothing fits: skipped, with the reason.
* Owners: the processes whose ``/proc/<pid>/maps`` or ``/proc/<pid>/fd/*`` name the segment.

Roles, given ``known_pids`` (pid -> "engine" or a rank "0", "1", ...): the engine writes the
broadcast ring and every local worker reads it; each worker writes its own response ring and the
engine reads it. So a ring the engine maps is "broadcast" when it has several readers and "response"
(with that worker's rank) when it has one reader and exactly one known worker maps it. Anything
else is "unknown" with the reason. Without ``known_pids`` the reader count alone decides.

Limits:
* TP=1: the broadcast ring has one reader too, and both rings are mapped by the engine and worker 0;
  nothing outside the processes tells them apart, so both are reported "unknown".
* Several deployments on one node share ``/dev/shm``: only ``known_pids`` (grouping by owners)
  separates them; without it every ring-shaped segment on the node is listed.
* A segment nobody maps any more (its deployment was killed, nobody unlinked it) has no owners;
  a worker that died no longer maps its rings either (the reason says which readers are missing).
  Forked children inherit mappings and inflate owner counts.
* Owners need read access to other processes' ``/proc/<pid>/maps`` (same user or root);
  unreadable or vanished pids are skipped quietly.
* The size must match exactly. Platforms that round a segment up to a page (vLLM accepts a larger
  segment there) break size solving; Linux tmpfs keeps the requested size.
* vLLM's other rings (e.g. a TP group's ``mq_broadcaster``, 6 x 4 MiB, written by a worker) are not
  default candidates; passed in ``layouts`` they show up with their reader count, and with
  ``known_pids`` as "unknown" (not mapped by the engine).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collectors.jsonrecords import JsonRecord
from watchdog.evidence.rings import RingError, RingLayout, inspect_ring

MiB = 1024 * 1024
MAX_READERS = 512
GENERIC_CHUNKS = 10
GENERIC_ALIGN = 1024

DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = (
    (10, 10 * MiB),  # MessageQueue default, older vLLM
    (10, 16 * MiB),  # rpc_broadcast_mq: VLLM_MQ_MAX_CHUNK_BYTES_MB=16
    (10, 24 * MiB),  # MessageQueue default, newer vLLM (worker_response_mq)
    (10, 1 << 16),  # the demo engine: EngineArgs.ring_chunks x ring_chunk_bytes
)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_DELETED = " (deleted)"


@dataclass(frozen=True)
class DiscoveredRing(JsonRecord):
    name: str
    layout: RingLayout
    role: str  # "broadcast", "response" or "unknown"
    owners: tuple[int, ...]  # pids mapping the segment, sorted
    rank: int | None  # the writing worker's rank, for a response ring
    reason: str  # how the role was decided (or why it could not be)


@dataclass(frozen=True)
class Discovery(JsonRecord):
    rings: tuple[DiscoveredRing, ...]
    skipped: tuple[str, ...]  # "<name>: <why it is not taken for a ring>"


def solve_layouts(size: int, layouts: Sequence[tuple[int, int]] = DEFAULT_CANDIDATES) -> list[RingLayout]:
    """Every candidate layout whose total size is exactly ``size`` (1..MAX_READERS readers)."""
    found: list[RingLayout] = []
    for chunks, chunk_bytes in layouts:
        if chunks < 1 or chunk_bytes < 1:
            continue
        rest = size - chunks * chunk_bytes
        if rest > 0 and rest % chunks == 0 and 1 <= rest // chunks - 1 <= MAX_READERS:
            layout = RingLayout(rest // chunks - 1, chunks, chunk_bytes)
            if layout not in found:
                found.append(layout)
    return found


def generic_layout(size: int) -> RingLayout | None:
    """10 chunks of some multiple of 1 KiB, if ``size`` fits one (at most one can: readers <= 512 < 1024)."""
    if size % GENERIC_CHUNKS:
        return None
    per_chunk = size // GENERIC_CHUNKS  # chunk_bytes + 1 + n_readers
    chunk_bytes = (per_chunk - 2) // GENERIC_ALIGN * GENERIC_ALIGN
    n_readers = per_chunk - chunk_bytes - 1
    if chunk_bytes < GENERIC_ALIGN or not 1 <= n_readers <= MAX_READERS:
        return None
    return RingLayout(n_readers, GENERIC_CHUNKS, chunk_bytes)


def map_owners(names: Iterable[str], shm_dir: str = "/dev/shm", proc_root: str = "/proc") -> dict[str, tuple[int, ...]]:
    """For each segment name, the pids that map it or hold it open (sorted; possibly empty).

    Reads ``<proc_root>/<pid>/maps`` (the path after the 5th field, ``" (deleted)"`` stripped) and the
    ``<proc_root>/<pid>/fd/*`` links. A pid that vanished or refuses access is skipped.
    """
    wanted = set(names)
    dirs = {os.path.abspath(shm_dir), os.path.realpath(shm_dir)}
    by_path = {os.path.join(d, n): n for d in dirs for n in wanted}
    owners: dict[str, set[int]] = {n: set() for n in wanted}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return {n: () for n in wanted}
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        for path in _mapped_paths(Path(proc_root) / entry):
            name = by_path.get(path[: -len(_DELETED)] if path.endswith(_DELETED) else path)
            if name is not None:
                owners[name].add(pid)
    return {n: tuple(sorted(p)) for n, p in owners.items()}


def _mapped_paths(pid_dir: Path) -> set[str]:
    paths: set[str] = set()
    try:
        with open(pid_dir / "maps", "rb") as f:
            for raw in f:
                fields = raw.rstrip(b"\n").split(maxsplit=5)
                if len(fields) == 6:
                    paths.add(fields[5].decode("utf-8", "surrogateescape"))
    except OSError:
        pass
    try:
        fds = os.listdir(pid_dir / "fd")
    except OSError:
        return paths
    for fd in fds:
        try:
            paths.add(os.readlink(pid_dir / "fd" / fd))
        except OSError:
            continue
    return paths


def discover_rings(
    shm_dir: str = "/dev/shm",
    proc_root: str = "/proc",
    known_pids: Mapping[int, str] | None = None,
    layouts: Sequence[tuple[int, int]] = DEFAULT_CANDIDATES,
    *,
    generic: bool = True,
) -> Discovery:
    """The ring-shaped segments in ``shm_dir``, each with its layout, role and owners. Never raises."""
    skipped: list[str] = []
    sizes: dict[str, int] = {}
    try:
        entries = sorted(os.listdir(shm_dir))
    except OSError as exc:
        return Discovery((), (f"{shm_dir}: cannot list: {exc.strerror or exc}",))
    for name in entries:
        if not _NAME.fullmatch(name):
            skipped.append(f"{name!a}: not a segment name")
            continue
        try:
            st = os.lstat(os.path.join(shm_dir, name))
        except OSError as exc:
            skipped.append(f"{name}: cannot stat: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append(f"{name}: not a regular file")
        elif st.st_size == 0:
            skipped.append(f"{name}: empty")
        else:
            sizes[name] = st.st_size
    owners = map_owners(sizes, shm_dir, proc_root) if sizes else {}
    rings: list[DiscoveredRing] = []
    for name, size in sizes.items():
        chosen = _choose_layout(name, size, owners[name], shm_dir, layouts, generic)
        if isinstance(chosen, str):
            skipped.append(f"{name}: {chosen}")
            continue
        layout, note = chosen
        role, rank, reason = _role(layout, owners[name], known_pids)
        rings.append(DiscoveredRing(name, layout, role, owners[name], rank, note + reason))
    return Discovery(tuple(rings), tuple(skipped))


def _choose_layout(
    name: str, size: int, owners: tuple[int, ...], shm_dir: str, layouts: Sequence[tuple[int, int]], generic: bool
) -> tuple[RingLayout, str] | str:
    """The one layout that fits and a note on how it was found, or why none (or several) does."""
    fits = solve_layouts(size, layouts)
    note = ""
    if not fits and generic:
        g = generic_layout(size)
        if g is not None and g.n_readers + 1 == len(owners):
            fits, note = [g], f"generic layout ({g.max_chunk_bytes}-byte chunks, confirmed by owners); "
        elif g is not None:
            return f"{size} bytes fit only a generic layout ({g.n_readers} readers), {len(owners)} owners disagree"
    if not fits:
        return f"{size} bytes fit no ring layout"
    sane: list[RingLayout] = []
    errors: list[str] = []
    for layout in fits:
        try:
            inspect_ring(name, layout, "unknown", shm_dir)
        except RingError as exc:
            errors.append(str(exc).removeprefix(f"ring {name}: "))
        else:
            sane.append(layout)
    if not sane:
        return "; ".join(errors)
    if len(sane) > 1:
        by_owners = [lay for lay in sane if lay.n_readers + 1 == len(owners)]
        if len(by_owners) != 1:
            readers = ", ".join(str(lay.n_readers) for lay in sane)
            return f"ambiguous: {len(sane)} layouts fit ({readers} readers) and {len(owners)} owners do not decide"
        sane = by_owners
    return sane[0], note


def _role(layout: RingLayout, owners: tuple[int, ...], known: Mapping[int, str] | None) -> tuple[str, int | None, str]:
    n = layout.n_readers
    if known is None:
        role = "broadcast" if n > 1 else "response"
        orphan = "; mapped by no readable process" if not owners else ""
        return role, None, f"{n} reader{'s' if n > 1 else ''}, no known pids: by reader count{orphan}"
    if not owners:
        return "unknown", None, "mapped by no readable process (left behind by a dead deployment?)"
    labels = {pid: known[pid] for pid in owners if pid in known}
    if not labels:
        return "unknown", None, f"mapped only by pids outside this deployment: {', '.join(map(str, owners))}"
    if "engine" not in labels.values():
        return "unknown", None, "not mapped by the engine"
    ranks = sorted(int(label) for label in labels.values() if label.isdigit())
    n_workers = sum(1 for label in known.values() if label.isdigit())
    if n > 1:
        missing = "" if len(ranks) == n else f"; only ranks {ranks} of {n} readers map it"
        return "broadcast", None, f"{n} readers, written by the engine{missing}"
    if n_workers == 1 and len(ranks) == 1:
        return "unknown", None, "one worker (TP=1): its broadcast and response rings look alike"
    if len(ranks) == 1:
        return "response", ranks[0], f"1 reader, mapped by the engine and worker {ranks[0]}"
    if not ranks:
        return "unknown", None, "1 reader, mapped by the engine but no known worker (its worker died?)"
    return "unknown", None, f"1 reader but mapped by workers {ranks}"


def deployment_specs(discovery: Discovery, known_pids: Mapping[int, str]) -> list[tuple[str, dict[str, Any]]] | None:
    """The rings of the deployment ``known_pids`` belong to, as (role, spec) in the engine ledger's order
    (broadcast, then each rank's response ring by rank); None unless exactly one broadcast ring is theirs."""
    ours = [r for r in discovery.rings if set(r.owners) & set(known_pids)]
    broadcast = [r for r in ours if r.role == "broadcast"]
    if len(broadcast) != 1:
        return None
    responses = sorted((r for r in ours if r.role == "response" and r.rank is not None), key=lambda r: r.rank or 0)

    def spec(r: DiscoveredRing) -> dict[str, Any]:
        return {"name": r.name, **r.layout.to_json()}

    return [("broadcast", spec(broadcast[0]))] + [("response", spec(r)) for r in responses]

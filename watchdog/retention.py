"""Bounded disk for incident bundles: by count and by bytes, oldest first.

Never deleted: the newest bundle, and the bundles of an incident not yet resolved (written since
the watched server last made progress: the evidence of what is wrong right now). Hidden
``.<id>.tmp`` directories are bundles a killed writer left half-written; they are removed at start
(and on each sweep once they are older than any write could take).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.bundle import is_bundle
from watchdog.logs import event

STALE_TMP_S = 300.0  # a bundle is written in well under a second; 5 minutes is certainly dead


@dataclass
class Sweep:
    kept: int = 0
    kept_bytes: int = 0
    deleted: list[str] = field(default_factory=list)
    tmp_removed: int = 0


@dataclass
class Retention:
    """The settings and the sweep's metrics (``on_sweep(kept, kept_bytes, deleted)``)."""

    incidents_dir: Path
    max_count: int = 100
    max_bytes: int = 1024 * 2**20
    on_sweep: Callable[[int, int, int], None] | None = None

    def start(self) -> Sweep:
        """At start-up: no bundle of ours is being written, so every ``.tmp`` is a leftover."""
        removed = remove_tmp(self.incidents_dir)
        if removed:
            event("retention", f"removed {removed} half-written bundle(s) left by a killed writer", tmp_removed=removed)
        return self.sweep()

    def sweep(self, keep: Collection[str] = ()) -> Sweep:
        out = sweep(self.incidents_dir, self.max_count, self.max_bytes, keep)
        if self.on_sweep is not None:
            self.on_sweep(out.kept, out.kept_bytes, len(out.deleted))
        return out


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # deleted meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove_tmp(incidents_dir: Path, older_than_s: float = 0.0) -> int:
    """Remove half-written ``.<id>.tmp`` bundles; 0.0 at start-up, when no writer of ours is running."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(incidents_dir))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed


def sweep(incidents_dir: Path, max_count: int, max_bytes: int, keep: Collection[str] = ()) -> Sweep:
    """Delete the oldest bundles until at most ``max_count`` remain and they hold at most ``max_bytes``."""
    out = Sweep(tmp_removed=remove_tmp(incidents_dir, STALE_TMP_S))
    try:
        found = [p for p in incidents_dir.iterdir() if not p.name.startswith(".") and p.is_dir() and is_bundle(p)]
    except OSError:
        return out
    # Bundle names start with a UTC timestamp; the modification time breaks ties within a second.
    bundles = sorted(((p.stat().st_mtime, p.name, p, _size(p)) for p in found), key=lambda t: (t[1][:16], t[0]))
    count, total = len(bundles), sum(b[3] for b in bundles)
    protected = set(keep) | ({bundles[-1][1]} if bundles else set())
    for _mtime, name, path, size in bundles:
        if count <= max_count and total <= max_bytes:
            break
        if name in protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        count, total = count - 1, total - size
        out.deleted.append(name)
    out.kept, out.kept_bytes = count, total
    if out.deleted:
        event(
            "retention",
            f"deleted {len(out.deleted)} old incident bundle(s); {count} kept ({total / 2**20:.1f} MiB)",
            deleted=out.deleted,
            kept=count,
            kept_bytes=total,
        )
    return out

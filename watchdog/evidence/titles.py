"""The deployment's processes as a source of its world size: vLLM's worker process titles.

vLLM names every worker process after its place in the parallel layout
(vllm/v1/executor/multiproc_executor.py: ``"Worker"`` + ``_DP<r>`` / ``_PP<r>`` / ``_PCP<r>`` /
``_TP<r>`` / ``_DCP<r>`` / ``_EP<r>`` for each dimension larger than 1), and ``set_process_title``
writes it over the process's argv as ``<VLLM_PROCESS_NAME_PREFIX>::<name>`` (``VLLM::Worker_TP1``,
NUL-padded). That is a statement of the TP size made by the processes themselves, independent of
the ledgers: a worker titled ``_TP3`` means the group has at least 4 ranks, whatever a damaged or
crafted ledger header claims.

Only a command line that is exactly such a title is used, and only its name part is kept: a command
line can hold secrets (and a demo's fault settings), which must never reach evidence or the analyzer.
The processes looked at are the children of the ranks' parents and of the engine (the executor
spawns its workers), so another deployment on the same node is not counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_TITLE = re.compile(rb"[A-Za-z0-9_.-]{1,64}::(Worker(?:_(?:DP|PP|PCP|TP|DCP|EP)\d{1,5})*)[\x00 ]*")
_MAX_CMDLINE = 4096


def _ppid(proc_root: str, pid: str) -> int | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            return int(f.read(4096).rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def worker_titles(proc_root: str, pids: Iterable[int]) -> dict[int, str]:
    """pid -> vLLM worker name (``Worker_TP1``) of the processes beside ``pids`` (the ranks and the engine)."""
    known = set(pids)
    parents = {pp for p in known if (pp := _ppid(proc_root, str(p))) is not None and pp > 1} | known
    try:
        entries = [e for e in os.listdir(proc_root) if e.isdigit()]
    except OSError:
        return {}
    out: dict[int, str] = {}
    for entry in entries:
        if _ppid(proc_root, entry) not in parents and int(entry) not in known:
            continue
        try:
            with open(f"{proc_root}/{entry}/cmdline", "rb") as f:
                raw = f.read(_MAX_CMDLINE)
        except OSError:
            continue
        m = _TITLE.fullmatch(raw)
        if m is not None:
            out[int(entry)] = m.group(1).decode()
    return out

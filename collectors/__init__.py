"""Per-rank ledgers: the recorder that runs inside vLLM processes and the reader the sidecar uses.

Stdlib only, no torch: this package is imported inside every TP worker.
"""

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.reader import Ledger, LedgerError, LedgerTail, ledger_paths, read_ledger
from collectors.recorder import Recorder, open_recorder

__all__ = [
    "CUDAGraphMode",
    "CollectiveOp",
    "GraphKey",
    "Ledger",
    "LedgerError",
    "LedgerTail",
    "ProcessKind",
    "Recorder",
    "Role",
    "ledger_paths",
    "open_recorder",
    "read_ledger",
]

"""A ledger writer for tests/test_ledger.py: as a script, writes records in a tight loop until killed.

Every field of record ``seq`` (except its monotonic timestamp) is derived from ``seq`` by
``expected``, so a reader can tell a genuine record from a torn or misread one. ``write`` issues
the Recorder call that produces ``expected(seq)`` as record number ``seq`` of a fresh recorder.

    python tests/ledger_writer_child.py DIR N_SLOTS [LIMIT]

With LIMIT it writes that many records and then hangs (asleep) until killed.
"""

from __future__ import annotations

import sys
import time

from collectors.format import (
    DTYPES,
    OPS,
    Collective,
    CUDAGraphMode,
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    Launch,
    ProcessKind,
    Record,
    Role,
    StepBegin,
    StepEnd,
)
from collectors.recorder import Recorder

M32 = 0xFFFFFFFF
MODES = (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL)
GROUPS = ("tp", "pp", "dp")
KINDS = 7  # record kinds, cycled by seq
RANK = 1
WORLD = 2


def key_of(seq: int) -> GraphKey:
    if seq % 3 == 0:  # small enough for a 64-bit key code: folded step begins of these are STEP records
        return GraphKey(
            mode=CUDAGraphMode.FULL if seq & 1 else CUDAGraphMode.PIECEWISE,
            num_tokens=(seq * 7) & 0x7FFFFFFF,
            num_reqs=None if seq % 5 == 0 else (seq * 3) & 0xFFFF,
            uniform=bool(seq & 1),
            has_lora=bool(seq & 2),
            num_active_loras=seq & 0xFF,
        )
    return GraphKey(
        mode=MODES[seq % 3],
        num_tokens=(seq * 7) & M32,
        num_reqs=None if seq % 5 == 0 else (seq * 3) & 0x7FFFFFFF,
        uniform=bool(seq & 1),
        has_lora=bool(seq & 2),
        num_active_loras=(seq * 5) & 0xFFFF,
    )


def expected(seq: int) -> Record:
    """Record ``seq`` as ``write`` produces it, with mono_ns 0."""
    kind = seq % KINDS
    if kind == 0:
        # every other step begin carries the model launch folded in (STEP, or STEP_BEGIN_LAUNCH for a
        # key too large for the STEP record's key code)
        folded = Launch(seq, seq, 0, Role.MODEL, key_of(seq), (seq * 40503) & M32) if seq // KINDS % 2 else None
        return StepBegin(
            seq, seq, 0, key_of(seq), (seq * 5) & M32, (seq * 11) & M32, (seq * 13) & M32, seq & 0xFF, folded
        )
    if kind == 1:
        return Launch(seq, seq, 0, Role(seq & 1), key_of(seq), (seq * 2654435761) & M32)
    if kind == 2:
        nth = seq // KINDS  # the nth collective overall; groups take turns
        return Collective(seq, seq, 0, GROUPS[nth % 3], OPS[1 + seq % 8], DTYPES[1 + seq % 9], seq * 17, nth // 3)
    if kind == 3:
        return StepEnd(seq, seq, 0, bool(seq & 4))
    if kind == 4:
        return EngineStep(
            seq, seq, 0, (seq * 3) & M32, seq & 0xFFFF, (seq >> 1) & 0xFFFF, seq & 7,
            (seq * 19) & M32, (seq * 23) & M32, (seq * 29) & M32, (seq * 31) & M32,
        )  # fmt: skip
    if kind == 5:
        return EngineResult(seq, seq, 0, bool(seq & 8), (seq * 37) & M32, (seq * 41) & M32, (seq * 43) & M32)
    return EngineQueue(seq, 0, (seq * 47) & M32, (seq * 53) & M32)


def write(rec: Recorder, seq: int) -> None:
    """Make ``rec`` write ``expected(seq)`` (it must be the recorder's record number ``seq``)."""
    r = expected(seq)
    if isinstance(r, StepBegin):
        rec.step_begin(
            r.step,
            r.key,
            unpadded_tokens=r.unpadded_tokens,
            unpadded_reqs=r.unpadded_reqs,
            padded_reqs=r.padded_reqs,
            placeholders=r.placeholders,
            launch_manifest=None if r.launch is None else r.launch.manifest_hash,
        )
    elif isinstance(r, Launch):
        rec.launch(r.step, r.role, r.key, r.manifest_hash)
    elif isinstance(r, Collective):
        rec.collective(r.step, r.group, r.op, r.dtype, r.numel)
    elif isinstance(r, StepEnd):
        rec.step_end(r.step, r.ok)
    elif isinstance(r, EngineStep):
        rec.engine_step(
            r.step,
            total_tokens=r.total_tokens,
            num_reqs=r.num_reqs,
            num_decode_reqs=r.num_decode_reqs,
            placeholders=r.placeholders,
            max_query_len=r.max_query_len,
            min_query_len=r.min_query_len,
            running=r.running,
            waiting=r.waiting,
        )
    elif isinstance(r, EngineResult):
        rec.engine_result(r.step, ok=r.ok, running=r.running, waiting=r.waiting, finished=r.finished)
    else:
        rec.engine_queue(running=r.running, waiting=r.waiting)


def main() -> None:
    directory, n_slots = sys.argv[1], int(sys.argv[2])
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    rec = Recorder(directory, kind=ProcessKind.WORKER, rank=RANK, world_size=WORLD, n_slots=n_slots)
    if not rec.enabled:
        sys.exit(3)
    rec.config(writer="ledger_writer_child")
    seq = 0
    while seq != limit:
        write(rec, seq)
        seq += 1
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()

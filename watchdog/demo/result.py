"""What one ``watchdog demo`` run returns: a typed result, and its ``--json`` form.

The JSON form (``DemoResult.to_json``) is the stable, versioned contract (``watchdog.demo/v1``): the
keys, their order and which ones appear are those the demo has always printed. A run under the
fallback (supervisor + proxy, over HTTP) has the fallback's keys and no ``watched``; a run of the
core loop alone has ``watched`` and, on GPUs or with a probe, ``device`` and ``probes``.

The fault's bite times are the demo's own knowledge (it injected the fault), never the analyzer's:
they only time detection here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from watchdog.incident import Incident
from watchdog.types import Diagnosis

DEMO_SCHEMA = "watchdog.demo/v1"


@dataclass(frozen=True)
class Requests:
    total: int
    succeeded: int
    failed: int
    # over HTTP (the fallback) every completion's text is checked, and failures are counted by kind
    wrong_text: int | None = None
    errors: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total": self.total, "succeeded": self.succeeded, "failed": self.failed}
        if self.wrong_text is not None or self.errors is not None:
            out.update(wrong_text=self.wrong_text, errors=dict(self.errors or {}))
        return out


@dataclass(frozen=True)
class DemoIncident:
    """One diagnosed incident, timed from when the fault bit (or, with no bite on record, from when
    the stuck step began)."""

    diagnosis: Diagnosis
    detected_after_s: float
    diagnosed_after_s: float
    bundle: str
    report: str

    def to_json(self, report: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "diagnosis": self.diagnosis.to_json(),
            "detected_after_s": self.detected_after_s,
            "diagnosed_after_s": self.diagnosed_after_s,
            "bundle": self.bundle,
        }
        if report:
            out["report"] = self.report
        return out


@dataclass(frozen=True)
class FaultBite:
    """When the injected defect bit in one process (rank None: the engine), seconds into the run."""

    rank: int | None
    after_s: float

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "after_s": self.after_s}


@dataclass(frozen=True)
class FallbackOutcome:
    """What the supervisor and the proxy did in a fallback run."""

    ladder: dict[str, Any]
    gave_up: bool
    proxy: dict[str, int]
    supervisor_exit: int | None


@dataclass(frozen=True)
class DemoResult:
    tp: int
    cudagraph_mode: str
    fault: str
    requests: Requests
    incidents: tuple[DemoIncident, ...]
    fault_bites: tuple[FaultBite, ...]
    workdir: str
    elapsed_s: float
    restarts: tuple[dict[str, Any], ...] = ()
    watched: bool = True  # False: --no-watch, an external agent watches (its incidents are not ours to see)
    fallback: FallbackOutcome | None = None
    device: str = "cpu"
    probes: tuple[dict[str, Any], ...] | None = None  # one per incident, when a probe was given
    vllm: dict[str, Any] | None = None  # --engine vllm: the server (executable, model) and the text check
    schema: str = field(default=DEMO_SCHEMA)

    @property
    def gave_up(self) -> bool:
        return self.fallback is not None and self.fallback.gave_up

    def to_json(self, reports: bool = True) -> dict[str, Any]:
        """The ``--json`` form; ``reports=False`` leaves each incident's text report out."""
        out: dict[str, Any] = {
            "schema": self.schema,
            "tp": self.tp,
            "cudagraph_mode": self.cudagraph_mode,
            "fault": self.fault,
            "requests": self.requests.to_json(),
            "incidents": [i.to_json(report=reports) for i in self.incidents],
            "fault_bites": [b.to_json() for b in self.fault_bites],
        }
        fb = self.fallback
        if fb is None:
            out.update(watched=self.watched, restarts=list(self.restarts))
        else:
            out.update(
                restarts=list(self.restarts),
                ladder=fb.ladder,
                gave_up=fb.gave_up,
                proxy=fb.proxy,
                supervisor_exit=fb.supervisor_exit,
            )
        out.update(workdir=self.workdir, elapsed_s=self.elapsed_s)
        if self.device != "cpu":
            out["device"] = self.device
        if self.probes is not None:
            out["probes"] = list(self.probes)
        if self.vllm is not None:
            out["vllm"] = self.vllm
        return out

    def missed(self) -> str | None:
        """A fault that bit with no incident after it is a failure of the demo: say so in one line."""
        if not self.fault_bites or self.incidents or (self.fallback is None and not self.watched):
            return None  # (--no-watch: an external agent watches, and its incidents are not ours to see)
        ranks = sorted({"engine" if b.rank is None else f"rank {b.rank}" for b in self.fault_bites})
        return (
            f"the {self.fault} fault bit ({', '.join(ranks)}, first {self.fault_bites[0].after_s:.2f} s in) "
            "and no incident followed: the watchdog missed it"
        )


def fault_bites(bites: list[tuple[int, int]], started_ns: int) -> tuple[FaultBite, ...]:
    """(rank, monotonic ns) pairs, rank -1 the engine, as bites timed from the run's start."""
    return tuple(FaultBite(None if r < 0 else r, round((ns - started_ns) / 1e9, 3)) for r, ns in bites)


def demo_incident(i: Incident, bite_ns: int | None) -> DemoIncident:
    # Detection is timed from when the fault bit; with no bite on record (a stall nobody
    # injected), from when the stuck step began.
    age_s = i.stall.age_s if i.stall is not None else 0.0
    origin = bite_ns if bite_ns is not None else i.detected_mono_ns - int(age_s * 1e9)
    return DemoIncident(
        diagnosis=i.diagnosis,
        detected_after_s=round((i.detected_mono_ns - origin) / 1e9, 3),
        diagnosed_after_s=round((i.diagnosed_mono_ns - origin) / 1e9, 3),
        bundle=str(i.bundle),
        report=i.report,
    )

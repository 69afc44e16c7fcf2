"""GPU telemetry from NVML: utilization, power, SM clock, compute pids and XID errors per device.

A replay hung in a collective shows 100 % utilization at high power, the same as real work; a
device that lost a peer or hit an XID error looks different. NVML is loaded lazily, so this module
imports (and ``FakeGpus`` works) on machines without the library; any NVML failure is an
``EvidenceError("nvml", why)``.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Protocol

from watchdog.evidence import EvidenceError
from watchdog.types import GpuInfo

_MAX_EVENTS_PER_SAMPLE = 256  # an XID storm must not stall a sample


class GpuSource(Protocol):
    def sample(self) -> tuple[GpuInfo, ...]: ...


class Nvml(GpuSource):
    """NVML through the ``pynvml`` module of nvidia-ml-py (or any module with its API, via ``nvml=``).

    ``xid_events`` holds the XIDs that arrived since the previous sample: NVML reports only
    events after registration, which happens at the first successful sample.
    """

    def __init__(self, nvml: Any = None, module: str = "pynvml") -> None:
        self._nvml = nvml
        self._module = module  # imported at the first sample when ``nvml`` is None
        self._ready = False
        self._events: Any = None  # an NVML event set, or None where events are unsupported
        self._lock = threading.Lock()  # the agent's metrics loop and a snapshot may sample at once

    def sample(self) -> tuple[GpuInfo, ...]:
        with self._lock:
            lib = self._load()
            try:
                if not self._ready:
                    lib.nvmlInit()
                    self._ready = True
                    self._events = self._register_xid_events(lib)
                handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(lib.nvmlDeviceGetCount())]
                xids = self._drain_xid_events(lib)
                return tuple(self._device(lib, i, h, xids.get(i, ())) for i, h in enumerate(handles))
            except lib.NVMLError as exc:
                raise EvidenceError("nvml", str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        with self._lock:
            if not self._ready:
                return
            lib = self._nvml
            try:
                if self._events is not None:
                    lib.nvmlEventSetFree(self._events)
                lib.nvmlShutdown()
            except lib.NVMLError:
                pass  # shutting down: nothing left to report to
            self._ready, self._events = False, None

    def _load(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module(self._module)
            except ImportError:
                raise EvidenceError("nvml", f"{self._module} not importable (pip install nvidia-ml-py)") from None
        return self._nvml

    @staticmethod
    def _device(lib: Any, index: int, handle: Any, xids: tuple[int, ...]) -> GpuInfo:
        return GpuInfo(
            index=index,
            utilization_pct=float(lib.nvmlDeviceGetUtilizationRates(handle).gpu),
            power_w=lib.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports milliwatts
            sm_clock_mhz=float(lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM)),
            xid_events=xids,
            pids=tuple(sorted(p.pid for p in lib.nvmlDeviceGetComputeRunningProcesses(handle))),
        )

    @staticmethod
    def _register_xid_events(lib: Any) -> Any:
        # Events are a bonus: unsupported on some devices and in some containers, so any failure
        # here only means "no XIDs", never a missing GPU sample.
        try:
            events = lib.nvmlEventSetCreate()
        except lib.NVMLError:
            return None
        xid = lib.nvmlEventTypeXidCriticalError
        registered = 0
        for i in range(lib.nvmlDeviceGetCount()):
            with contextlib.suppress(lib.NVMLError):
                lib.nvmlDeviceRegisterEvents(lib.nvmlDeviceGetHandleByIndex(i), xid, events)
                registered += 1
        if registered:
            return events
        with contextlib.suppress(lib.NVMLError):
            lib.nvmlEventSetFree(events)
        return None

    def _drain_xid_events(self, lib: Any) -> dict[int, tuple[int, ...]]:
        if self._events is None:
            return {}
        got: dict[int, list[int]] = {}
        try:
            for _ in range(_MAX_EVENTS_PER_SAMPLE):
                data = lib.nvmlEventSetWait(self._events, 0)  # 0 ms: never blocks; Timeout when empty
                if data.eventType & lib.nvmlEventTypeXidCriticalError:
                    got.setdefault(lib.nvmlDeviceGetIndex(data.device), []).append(int(data.eventData))
        except lib.NVMLError:
            pass  # NVML_ERROR_TIMEOUT: queue empty (or events broke: XIDs are best effort)
        return {i: tuple(x) for i, x in got.items()}


class FakeGpus(GpuSource):
    """Canned GPU samples, or a canned error."""

    def __init__(self, gpus: tuple[GpuInfo, ...] = (), error: EvidenceError | None = None) -> None:
        self.gpus = gpus
        self.error = error
        self.calls = 0

    def sample(self) -> tuple[GpuInfo, ...]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.gpus

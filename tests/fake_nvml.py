"""A fake of pynvml's API (the slice Nvml uses), for machines without NVIDIA GPUs.

Two devices, 100 % busy and idle, XIDs on device 0 only. Used in-process by tests/test_evidence.py
(``FakeNvmlLib``) and as a module by agent processes (``--nvml-module tests.fake_nvml``, with the
repository on PYTHONPATH): the module-level functions are one ``FakeNvmlLib``'s methods.
"""

from __future__ import annotations

from typing import Any


class FakeNvmlLib:
    """The slice of pynvml's API (and its names) that Nvml uses: two devices, XIDs on device 0 only."""

    class NVMLError(Exception):
        pass

    class NVMLError_Timeout(NVMLError):
        pass

    NVML_CLOCK_SM = 1
    nvmlEventTypeXidCriticalError = 8

    class _Obj:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    def __init__(self, *, events_supported: bool = True, power_fails: bool = False) -> None:
        self.inits = 0
        self.shutdowns = 0
        self.events_supported = events_supported
        self.power_fails = power_fails
        self.queue: list[Any] = []

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"dev{i}"

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return int(handle[3:])

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return self._Obj(gpu=100 if handle == "dev0" else 0, memory=5)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if self.power_fails:
            raise self.NVMLError("GPU is lost")
        return 412_500

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [self._Obj(pid=4242), self._Obj(pid=4100)] if handle == "dev0" else []

    def nvmlEventSetCreate(self) -> str:
        if not self.events_supported:
            raise self.NVMLError("Not Supported")
        return "evset"

    def nvmlDeviceRegisterEvents(self, handle: str, types: int, evset: str) -> None:
        if handle != "dev0":
            raise self.NVMLError("Not Supported")

    def nvmlEventSetWait(self, evset: str, timeout_ms: int) -> Any:
        assert timeout_ms == 0
        if not self.queue:
            raise self.NVMLError_Timeout("Timeout")
        return self.queue.pop(0)

    def nvmlEventSetFree(self, evset: str) -> None:
        pass


_lib = FakeNvmlLib()
NVMLError = FakeNvmlLib.NVMLError
NVMLError_Timeout = FakeNvmlLib.NVMLError_Timeout
NVML_CLOCK_SM = FakeNvmlLib.NVML_CLOCK_SM
nvmlEventTypeXidCriticalError = FakeNvmlLib.nvmlEventTypeXidCriticalError
nvmlInit = _lib.nvmlInit
nvmlShutdown = _lib.nvmlShutdown
nvmlDeviceGetCount = _lib.nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex = _lib.nvmlDeviceGetHandleByIndex
nvmlDeviceGetIndex = _lib.nvmlDeviceGetIndex
nvmlDeviceGetUtilizationRates = _lib.nvmlDeviceGetUtilizationRates
nvmlDeviceGetPowerUsage = _lib.nvmlDeviceGetPowerUsage
nvmlDeviceGetClockInfo = _lib.nvmlDeviceGetClockInfo
nvmlDeviceGetComputeRunningProcesses = _lib.nvmlDeviceGetComputeRunningProcesses
nvmlEventSetCreate = _lib.nvmlEventSetCreate
nvmlDeviceRegisterEvents = _lib.nvmlDeviceRegisterEvents
nvmlEventSetWait = _lib.nvmlEventSetWait
nvmlEventSetFree = _lib.nvmlEventSetFree

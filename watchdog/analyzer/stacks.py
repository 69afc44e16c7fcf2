"""What a thread is doing, from its stack. Pure."""

from __future__ import annotations

from watchdog.analyzer.config import AnalyzerConfig
from watchdog.types import Frame, StackDump, ThreadActivity, ThreadStack


def _matches(frame: Frame, patterns: tuple[str, ...]) -> bool:
    name = frame.name
    return any(name == p or name.endswith("." + p) for p in patterns)


def _native_collective(frame: Frame, patterns: tuple[str, ...]) -> bool:
    return any(p in frame.name for p in patterns)


def classify(thread: ThreadStack, cfg: AnalyzerConfig, *, device: bool = False) -> tuple[ThreadActivity, Frame | None]:
    """The activity of one thread and the frame that decided it (innermost match wins)."""
    for frame in thread.frames:
        if _matches(frame, cfg.collective_frames) or _native_collective(frame, cfg.native_collective_frames):
            return ThreadActivity.COLLECTIVE, frame
        if _matches(frame, cfg.sync_frames):
            return ThreadActivity.DEVICE_SYNC, frame
        if _matches(frame, cfg.ring_wait_frames):
            return ThreadActivity.RING_WAIT, frame
        if device and _matches(frame, cfg.device_idle_frames):
            # The stream loop itself innermost: waiting for work. Below a kernel: running it.
            if frame is thread.frames[0]:
                return ThreadActivity.QUEUE_WAIT, frame
            return ThreadActivity.KERNEL, thread.frames[0]
    if not thread.frames:
        return ThreadActivity.UNKNOWN, None
    return (ThreadActivity.KERNEL if device else ThreadActivity.HOST_CODE), thread.frames[0]


def find_thread(dump: StackDump | None, names: tuple[str, ...]) -> ThreadStack | None:
    if dump is None:
        return None
    for t in dump.threads:
        if t.name in names:
            return t
    return None


# What a native stack may add to a Python one: the wait below an opaque call (a compiled graph's
# ``OpOverload.__call__`` is host code to py-spy's Python frames, a collective to its native ones).
_WAITS = (ThreadActivity.COLLECTIVE, ThreadActivity.DEVICE_SYNC, ThreadActivity.RING_WAIT)


def host_activity(
    dump: StackDump | None, cfg: AnalyzerConfig, native: StackDump | None = None
) -> tuple[ThreadActivity, Frame | None]:
    """The host thread's activity: from its Python stack, or from its native stack where that shows a
    wait the Python frames cannot (both are dumps of the same stuck thread, taken moments apart)."""
    thread = find_thread(dump, cfg.host_thread_names)
    act, frame = classify(thread, cfg) if thread is not None else (ThreadActivity.UNKNOWN, None)
    if act in _WAITS:
        return act, frame
    nthread = find_thread(native, cfg.host_thread_names)
    if nthread is not None:
        nact, nframe = classify(nthread, cfg)
        if nact in _WAITS:
            return nact, nframe
    return act, frame


def device_activity(dump: StackDump | None, cfg: AnalyzerConfig) -> tuple[ThreadActivity, Frame | None]:
    thread = find_thread(dump, cfg.device_thread_names)
    if thread is None:
        return ThreadActivity.UNKNOWN, None
    return classify(thread, cfg, device=True)


def where(frame: Frame | None) -> str:
    if frame is None:
        return "?"
    short = frame.filename.rsplit("/", 1)[-1]
    return f"{frame.name} ({short}:{frame.line})"

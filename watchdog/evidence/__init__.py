"""Evidence sources (py-spy stacks, psutil process state, NVML GPUs, shm rings): failures are EvidenceError values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class EvidenceError(Exception):
    """One piece of evidence could not be collected; the snapshot turns it into a "missing: ..." line."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(what, why)
        self.what = what
        self.why = why

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


def json_field(d: Any, key: str, kind: type[T], where: str) -> T:
    """``d[key]`` checked by ``json_value``; ValueError naming ``where`` if ``d`` or the key is missing."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: missing {key!r}")
    return json_value(d[key], kind, f"{where}.{key}")


def json_value(value: Any, kind: type[T], where: str) -> T:
    """``value`` checked to be a ``kind``; ValueError naming ``where`` otherwise.

    Shared by the evidence modules' ``*_from_json`` so a damaged bundle gives one precise line.
    bool is not accepted as an int (JSON true is not a line number); an int is accepted as a float.
    """
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]  # T is float here
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value

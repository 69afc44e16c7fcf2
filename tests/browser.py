"""A real headless Chromium (Debian's ``chromium``) for page tests: the DOM it built, a screenshot,
and a PNG decoder (zlib only) to tell a drawn page from a blank one.

Without chromium the tests skip on a developer machine and fail in CI (WATCHDOG_CI=1 installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

# As root, with no network: no sandbox, no GPU, nothing that phones home.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
TIMEOUT_S = 90


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail(f"WATCHDOG_CI=1 and {reason}")
        pytest.skip(reason)
    return path


def _run(args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            # chromium forks helpers (zygote, renderer): none may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return out


def dump_dom(url: str) -> str:
    """The DOM after the page loaded and its scripts ran, serialized."""
    return _run(["--dump-dom", url])


def screenshot(url: str, png: Path, width: int = 1160, height: int = 900) -> bytes:
    # every compositor stage and a virtual-time budget: layout and paint finish before the capture, even on
    # a loaded machine (without them, tiles not yet rastered come out white)
    finish = ["--run-all-compositor-stages-before-draw", "--virtual-time-budget=3000"]
    _run([f"--screenshot={png}", f"--window-size={width},{height}", *finish, url])
    return png.read_bytes()


# ---- the DOM, as a small tree ---------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node]
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)

    def find(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Every node below (and including) this one with ``tag`` and these attribute values
        (``class_`` matches one class)."""
        found = []
        want_class = attrs.pop("class_", None)
        stack: list[Node] = [self]
        while stack:
            n = stack.pop()
            same = all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
            if (tag is None or n.tag == tag) and same and (want_class is None or want_class in n.classes):
                found.append(n)
            stack.extend(reversed(n.children))
        return found


VOID = {"meta", "link", "br", "img", "input", "hr", "source", "area", "base", "col", "embed", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, [])
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, [])
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}, []))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(Node("#text", {}, [], data))


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


# ---- PNG (8-bit RGB / RGBA, non-interlaced: what Chromium writes) ---------------------------------


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = ctype = 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 4 if ctype == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        prev = line
        rgb = line if bpp == 3 else bytearray(b for i, b in enumerate(line) if i % 4 != 3)
        rows.append(bytes(rgb))
    return width, height, rows


def png_stats(data: bytes) -> tuple[int, int, int, float]:
    """(width, height, distinct colours, fraction of pixels that are not white)."""
    width, height, rows = png_pixels(data)
    colours: set[bytes] = set()
    ink = 0
    for row in rows:
        for x in range(0, len(row), 3):
            px = row[x : x + 3]
            colours.add(px)
            ink += px != b"\xff\xff\xff"
    return width, height, len(colours), ink / max(width * height, 1)

"""Colours of the incident page, and the WCAG contrast rule every text on them must pass."""

from __future__ import annotations

from collectors.format import CUDAGraphMode, GraphKey

# Okabe-Ito: told apart with the common colour-vision deficiencies. Every bar also carries its key
# as text (or in its tooltip when too narrow), so nothing is said by colour alone.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
INK = "#1A1A1A"
PAPER = "#FFFFFF"
ALERT = "#B00020"  # the stuck step's outline, the culprit's label
CULPRIT_BG = "#FDECEA"
ENGINE = "#D9D9D9"
MISSING_BG = "#EEEEEE"
MUTED = "#595959"  # secondary text on white (7.0:1)
MIN_CONTRAST = 4.5


def _channel(c: int) -> float:
    s = c / 255
    return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4


def luminance(hex_colour: str) -> float:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return 0.2126 * _channel(r) + 0.7152 * _channel(g) + 0.0722 * _channel(b)


def contrast(a: str, b: str) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_on(fill: str) -> str:
    """Black or white text, whichever reads better on ``fill``."""
    return INK if contrast(INK, fill) >= contrast(PAPER, fill) else PAPER


def key_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def short_key(key: GraphKey) -> str:
    """A bar's label: mode initial and tokens (F64, P184, N512), requests when the key names them."""
    mode = {CUDAGraphMode.FULL: "F", CUDAGraphMode.PIECEWISE: "P", CUDAGraphMode.NONE: "N"}.get(key.mode, "?")
    reqs = "" if key.num_reqs is None else f"/{key.num_reqs}"
    return f"{mode}{key.num_tokens}{reqs}"

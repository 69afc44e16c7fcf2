"""The incident picture as inline SVG: readable with no script (labels, <title> tooltips). Pure."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from collectors.format import GraphKey
from watchdog.page import colors as c
from watchdog.page.timeline import Bar, Lane, Timeline

WIDTH = 1100
LABEL_W = 190
RIGHT = 24
TOP = 34  # step labels
BOTTOM = 40  # time axis
LANE_H = 40
BAR_H = 20
DRAFTER_H = 7
BREAK_W = 110  # the compressed stretch between the last event and "now", when that gap dwarfs the steps


def _esc(s: object) -> str:
    return escape(str(s), quote=True)


def _ms(ns: int) -> str:
    ms = ns / 1e6
    if abs(ms) >= 1000:
        return f"{ms / 1000:+.2f} s"
    return f"{ms:+.1f} ms" if abs(ms) < 10 else f"{ms:+.0f} ms"


class Scale:
    """Linear over the steps; when "now" lies far beyond the last event, that gap is drawn compressed."""

    def __init__(self, tl: Timeline) -> None:
        self.x0, self.x1 = LABEL_W, WIDTH - RIGHT
        lo = min(tl.first_ns, tl.zero_ns)
        hi = max(tl.last_event_ns, tl.zero_ns)
        span = max(hi - lo, 1_000_000)
        self.lo = lo - span // 40
        self.hi = hi + span // 40
        self.now = max(tl.now_ns, self.hi)
        self.broken = self.now - self.hi > span // 4
        self.lin_x1 = self.x1 - BREAK_W if self.broken else self.x1
        if not self.broken:
            self.hi = self.now

    def x(self, t: int) -> float:
        if t <= self.hi or not self.broken:
            return self.x0 + (t - self.lo) / max(self.hi - self.lo, 1) * (self.lin_x1 - self.x0)
        frac = (t - self.hi) / max(self.now - self.hi, 1)
        return self.lin_x1 + 14 + frac * (self.x1 - self.lin_x1 - 14)


def _nice_step(span_ms: float) -> float:
    raw = span_ms / 7
    for mult in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000):
        for base in (0.01, 0.1, 1.0):
            if base * mult >= raw:
                return base * mult
    return raw


def _axis(tl: Timeline, sc: Scale, bottom: float) -> list[str]:
    out = [f'<line x1="{sc.x0}" y1="{bottom}" x2="{sc.x1}" y2="{bottom}" stroke="{c.INK}"/>']
    step = _nice_step((sc.hi - sc.lo) / 1e6)
    k = int((sc.lo - tl.zero_ns) / 1e6 // step)
    while True:
        ms = k * step
        t = tl.zero_ns + int(ms * 1e6)
        k += 1
        if t < sc.lo:
            continue
        if t > sc.hi:
            break
        x = sc.x(t)
        label = "0" if ms == 0 else _ms(int(ms * 1e6))
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="{c.INK}"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 17}" text-anchor="middle" class="ax">{_esc(label)}</text>')
    if sc.broken:
        bx = sc.lin_x1 + 7
        out.append(
            f'<path d="M{bx - 5},{bottom - 6} l4,12 M{bx + 1},{bottom - 6} l4,12" stroke="{c.INK}" stroke-width="1.5"/>'
        )
    out.append(
        f'<text x="{sc.x1}" y="{bottom + 32}" text-anchor="end" class="ax">now ({_esc(tl.now_label)}): '
        f"{_esc(_ms(tl.now_ns - tl.zero_ns))}</text>"
    )
    out.append(
        f'<text x="{sc.x0}" y="{bottom + 32}" class="ax">time relative to the stall (0: {_esc(tl.zero_label)})</text>'
    )
    return out


def _tip(lane: Lane, b: Bar, tl: Timeline) -> str:
    who = lane.name
    if lane.rank is None and not b.dispatched:
        return f"engine step {b.step}: never dispatched; the engine's last record at {_ms(b.begin_ns - tl.zero_ns)}"
    if lane.rank is None:
        state = "no result yet" if b.end_ns is None else f"{(b.end_ns - b.begin_ns) / 1e6:.1f} ms"
        return f"engine step {b.step}: dispatched at {_ms(b.begin_ns - tl.zero_ns)}, {state}; {b.detail}"
    parts = [f"{who} step {b.step}: {b.key.label() if b.key else '?'}"]
    if b.padded_reqs:
        parts.append(f"{b.padded_reqs} padded request slot(s)")
    if b.drafter_key is not None:
        parts.append(f"drafter {b.drafter_key.label()}")
    parts.append(f"began {_ms(b.begin_ns - tl.zero_ns)}")
    if b.end_ns is None:
        parts.append(f"NEVER ENDED (open {(tl.now_ns - b.begin_ns) / 1e6:.0f} ms at {tl.now_label})")
    else:
        parts.append(f"took {(b.end_ns - b.begin_ns) / 1e6:.2f} ms")
    if b.ticks:
        parts.append(f"{len(b.ticks)} eager collective(s)")
    return "; ".join(parts)


def _bar(lane: Lane, b: Bar, y: float, tl: Timeline, sc: Scale, colour: Callable[[GraphKey | None], str]) -> list[str]:
    x1 = sc.x(b.begin_ns)
    x2 = sc.x(tl.now_ns if b.end_ns is None else b.end_ns)
    w = max(x2 - x1, 2.0)
    fill = c.ENGINE if lane.rank is None else colour(b.key)
    is_open = b.end_ns is None
    cls = "bar open" if is_open else "bar"
    tip = _esc(_tip(lane, b, tl))
    out = [f'<g class="{cls}" data-step="{b.step}" data-tip="{tip}"><title>{tip}</title>']
    stroke = (
        f' stroke="{c.ALERT}" stroke-width="3" stroke-dasharray="6 3"'
        if is_open
        else f' stroke="{c.INK}" stroke-width="0.5"'
    )
    out.append(f'<rect x="{x1:.1f}" y="{y:.1f}" width="{w:.1f}" height="{BAR_H}" fill="{fill}"{stroke}/>')
    if b.padded_reqs:
        out.append(f'<rect x="{x1:.1f}" y="{y:.1f}" width="{w:.1f}" height="5" fill="url(#pad)"/>')
    for t, _what in b.ticks:
        tx = sc.x(t)
        out.append(
            f'<line class="tick" x1="{tx:.1f}" y1="{y - 2:.1f}" x2="{tx:.1f}" y2="{y + BAR_H + 2:.1f}" '
            f'stroke="{c.INK}" stroke-width="1.5"/>'
        )
    if b.drafter_key is not None and b.drafter_ns is not None:
        dx = sc.x(b.drafter_ns)
        out.append(
            f'<rect class="drafter" x="{dx:.1f}" y="{y + BAR_H + 2:.1f}" width="{max(x2 - dx, 2.0):.1f}" '
            f'height="{DRAFTER_H}" fill="{colour(b.drafter_key)}" stroke="{c.INK}" stroke-width="0.5"/>'
        )
    key = "engine" if lane.rank is None else (c.short_key(b.key) if b.key else "?")
    drafter = "" if b.drafter_key is None else f" d:{c.short_key(b.drafter_key)}"
    pad = f" +{b.padded_reqs}pad" if b.padded_reqs and lane.rank is not None else ""
    # the longest label that fits: the key is never said by colour alone (the tooltip has it all)
    if lane.rank is None:
        if not b.dispatched:
            choices = [f"step {b.step} NEVER DISPATCHED", "NOT DISPATCHED"]
        else:
            choices = [f"step {b.step} NO RESULT", "NO RESULT"] if is_open else ["engine"]
    elif is_open:
        choices = [f"step {b.step} NEVER ENDED  {key}{pad}{drafter}", f"NEVER ENDED {key}{drafter}"]
        choices += [f"NEVER ENDED {key}", "NEVER ENDED"]
    else:
        choices = [f"{key}{pad}{drafter}", f"{key}{drafter}", key]
    label = next((t for t in choices if w >= 7.3 * len(t) + 6), "")
    if label:
        out.append(f'<text x="{x1 + 4:.1f}" y="{y + 15:.1f}" fill="{c.text_on(fill)}" class="bl">{_esc(label)}</text>')
    out.append("</g>")
    return out


def render_svg(tl: Timeline) -> str:
    sc = Scale(tl)
    index = {k: i for i, k in enumerate(tl.keys)}

    def colour(k: GraphKey | None) -> str:
        return c.ENGINE if k is None else c.key_colour(index.get(k, 0))

    height = TOP + LANE_H * len(tl.lanes) + BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" role="img" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" aria-labelledby="tl-title">',
        f'<title id="tl-title">Every rank\'s last {len(tl.steps)} steps before the stall; '
        f"step {tl.focus_step} at 0</title>",
        '<defs><pattern id="pad" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="{c.PAPER}"/><rect width="3" height="6" fill="{c.INK}"/></pattern>'
        '<pattern id="gone" width="10" height="10" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        f'<rect width="10" height="10" fill="{c.MISSING_BG}"/><rect width="2" height="10" fill="#CCCCCC"/>'
        "</pattern></defs>",
    ]
    # step numbers over the lanes, where the step began on the first lane that has it
    labels: list[tuple[float, int]] = []
    for s in tl.steps:
        begins = [b.begin_ns for lane in tl.lanes if lane.rank is not None for b in lane.bars if b.step == s]
        if not begins:
            continue
        x = sc.x(min(begins))
        while labels and x - labels[-1][0] < 58:  # too close: the focus step keeps its label, others give way
            if s != tl.focus_step:
                break
            labels.pop()
        else:
            labels.append((x, s))
    for x, s in labels:
        weight = ' font-weight="bold"' if s == tl.focus_step else ""
        out.append(f'<text x="{x:.1f}" y="{TOP - 10}" class="ax"{weight}>step {s}</text>')
    zx = sc.x(tl.zero_ns)
    out.append(
        f'<line x1="{zx:.1f}" y1="{TOP - 6}" x2="{zx:.1f}" y2="{TOP + LANE_H * len(tl.lanes)}" '
        f'stroke="{c.ALERT}" stroke-width="1" stroke-dasharray="3 3"/>'
    )
    for i, lane in enumerate(tl.lanes):
        y0 = TOP + i * LANE_H
        cls = "lane culprit" if lane.culprit else "lane"
        rank_attr = "engine" if lane.rank is None else str(lane.rank)
        out.append(f'<g class="{cls}" data-rank="{rank_attr}">')
        if lane.culprit:
            out.append(f'<rect x="0" y="{y0}" width="{WIDTH}" height="{LANE_H}" fill="{c.CULPRIT_BG}"/>')
        elif i % 2:
            out.append(f'<rect x="0" y="{y0}" width="{WIDTH}" height="{LANE_H}" fill="#F7F7F7"/>')
        name = lane.name + ("  \u2605 culprit" if lane.culprit else "")
        ink = c.ALERT if lane.culprit else c.INK
        out.append(f'<text x="8" y="{y0 + 17}" fill="{ink}" class="ln">{_esc(name)}</text>')
        if lane.state:
            out.append(f'<text x="8" y="{y0 + 32}" fill="{c.MUTED}" class="ls">{_esc(lane.state)}</text>')
        if lane.missing:
            out.append(
                f'<rect x="{sc.x0}" y="{y0 + 6}" width="{sc.x1 - sc.x0}" height="{BAR_H + 8}" fill="url(#gone)"/>'
            )
            out.append(f'<text x="{sc.x0 + 10}" y="{y0 + 24}" fill="{c.INK}" class="bl">{_esc(lane.missing)}</text>')
        for b in lane.bars:
            out.extend(_bar(lane, b, y0 + 6, tl, sc, colour))
        out.append("</g>")
    out.extend(_axis(tl, sc, TOP + LANE_H * len(tl.lanes) + 4))
    out.append("</svg>")
    return "\n".join(out)


def legend(tl: Timeline) -> str:
    """The graph keys drawn, colour swatch beside the text label (the label alone is enough)."""
    items = []
    for i, k in enumerate(tl.keys):
        fill = c.key_colour(i)
        items.append(
            f'<li><span class="sw" style="background:{fill};color:{c.text_on(fill)}">{_esc(c.short_key(k))}</span> '
            f"{_esc(k.label())}</li>"
        )
    items.append('<li><span class="sw pad">&nbsp;</span> hatched top: padded request slots (+Npad)</li>')
    items.append('<li><span class="sw tickk">|</span> eager collective (host-issued), hover for op and size</li>')
    items.append('<li><span class="sw open">&nbsp;</span> red dashed outline: the step never ended (drawn to now)</li>')
    items.append("<li>thin bar under a step: the drafter's launch, coloured by its key (d:...)</li>")
    return '<ul class="legend">' + "".join(items) + "</ul>"

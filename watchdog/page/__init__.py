"""The incident page: one self-contained HTML file per incident. Pure: (Snapshot, Diagnosis) -> text.

No CDN, font or script from elsewhere: it must open on an air-gapped laptop from a copied bundle.
The picture is inline SVG (readable with scripts off); a few lines of inline script only make the
hover details quicker to read than the browser's own tooltips.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from watchdog.page.style import CSS, JS
from watchdog.page.svg import legend, render_svg
from watchdog.page.timeline import DEFAULT_STEPS, build
from watchdog.types import Diagnosis, Snapshot, StackDump, Verdict

__all__ = ["PageContext", "render_index", "render_page"]

VERDICT_TEXT = {
    Verdict.COLLECTIVE_MISMATCH: "Ranks ran different collectives",
    Verdict.DEVICE_HANG: "Every rank is stuck on the device",
    Verdict.HOST_HANG: "A rank is stuck in host code",
    Verdict.WORKER_DEAD: "A worker process died",
    Verdict.ENGINE_STALL: "The engine stopped dispatching",
    Verdict.INCONCLUSIVE: "Stalled; cause not determined",
    Verdict.NO_DEADLOCK: "No deadlock found",
}


@dataclass(frozen=True)
class PageContext:
    """What the bundle's evidence alone does not say; every field optional."""

    incident: str = ""  # the bundle's name
    detected_wall_ns: int = 0  # when the detector fired (or the diagnosis was asked for)
    diagnosed_after_s: float | None = None  # detection -> diagnosis written
    supervisor: Mapping[str, Any] | None = None  # what `watchdog run` did (see supervisor_section)


def _e(s: object) -> str:
    return escape(str(s), quote=True)


def _when(wall_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall_ns / 1e9)) if wall_ns > 0 else "unknown"


def _items(lines: Sequence[str], empty: str) -> str:
    if not lines:
        return f'<p class="muted">{_e(empty)}</p>'
    return "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>"


def _banner(s: Snapshot, d: Diagnosis, ctx: PageContext) -> str:
    culprits = ", ".join(map(str, d.culprit_ranks)) or "none named"
    facts = [
        ("verdict", d.verdict.value),
        ("culprit rank(s)", culprits),
        ("step", "-" if d.step is None else str(d.step)),
        ("detected", _when(ctx.detected_wall_ns or s.taken_wall_ns)),
    ]
    if s.stall is not None:
        facts.append(("stall", f"{s.stall.kind}: {s.stall.age_s:.2f} s open, deadline {s.stall.deadline_s:.2f} s"))
    if ctx.diagnosed_after_s is not None:
        facts.append(("diagnosed", f"{ctx.diagnosed_after_s:.2f} s after detection"))
    if not s.live:
        facts.append(("source", "post-mortem on ledgers alone"))
    cells = "".join(f'<div><span class="k">{_e(k)}</span> <b data-field="{_e(k)}">{_e(v)}</b></div>' for k, v in facts)
    cls = "deadlock" if d.verdict.is_deadlock else ("unsure" if d.verdict is Verdict.INCONCLUSIVE else "fine")
    return (
        f'<header class="banner {cls}" id="verdict" data-verdict="{_e(d.verdict.value)}">'
        f'<h1><span class="vname">{_e(d.verdict.value)}</span> &mdash; {_e(VERDICT_TEXT[d.verdict])}</h1>'
        f'<p class="summary">{_e(d.summary)}</p><div class="facts">{cells}</div></header>'
    )


def _divergence(d: Diagnosis) -> str:
    """One row per rank, so that eight ranks read as well as two; in a column where ranks differ, the
    values that are not the most common one are highlighted (and the column marked, not only coloured)."""
    div = d.first_divergence
    if div is None:
        return ""
    fields = ("op", "group", "dtype", "numel", "from")

    def value(r: int, f: str) -> str:
        if f == "from":
            return div.sources.get(r, "?")
        op = div.per_rank.get(r)
        return "none (no collective here)" if op is None else str(getattr(op, f))

    ranks = sorted(set(div.per_rank) | set(div.sources))
    table = {r: {f: value(r, f) for f in fields} for r in ranks}
    peers = [r for r in ranks if r not in d.culprit_ranks] or ranks  # a tie (2 ranks) goes to the culprit's peers
    common: dict[str, str | None] = {}
    for f in fields:
        vals = [table[r][f] for r in peers]
        common[f] = max(vals, key=vals.count) if len({table[r][f] for r in ranks}) > 1 else None
    head = "".join(f"<th>{f}{' &#8800;' if common[f] is not None else ''}</th>" for f in fields)
    rows = []
    for r in ranks:
        culprit = r in d.culprit_ranks
        tds = "".join(
            f'<td class="diff">{_e(v)}</td>' if common[f] is not None and v != common[f] else f"<td>{_e(v)}</td>"
            for f, v in table[r].items()
        )
        cls, mark = (' class="culprit"', " (culprit)") if culprit else ("", "")
        rows.append(f'<tr{cls} data-rank="{r}"><th>rank {r}{mark}</th>{tds}</tr>')
    return (
        f'<section id="divergence"><h2>First divergent collective: step {div.step}, collective #{div.index}</h2>'
        f'<div class="scroll"><table class="div"><tr><th>rank</th>{head}</tr>{"".join(rows)}</table></div>'
        '<p class="muted">&#8800; marks the fields in which the ranks differ (the odd values highlighted); "from" '
        "names the captured graph (mode, tokens, requests, position in its manifest) or the eager call that "
        "issued it.</p></section>"
    )


def _stack_text(dump: StackDump) -> str:
    lines = []
    for t in dump.threads:
        lines.append(f"thread {t.name} ({t.thread_id}){' active' if t.active else ''}")
        lines += [f"    {f.name} ({f.filename}:{f.line})" for f in t.frames]
    return "\n".join(lines)


def _ranks(s: Snapshot, d: Diagnosis) -> str:
    rows = []
    for r in sorted({*d.ranks, *s.ranks}):
        rep = d.ranks.get(r)
        ev = s.ranks.get(r)
        state = "unknown" if rep is None else rep.state.value
        key = "-" if rep is None or rep.graph_key is None else rep.graph_key.label()
        if rep is not None and rep.padded_reqs:
            key += f", {rep.padded_reqs} padded slot(s)"
        if rep is not None and rep.drafter_key is not None:
            key += f"; drafter {rep.drafter_key.label()}"
        step = "-" if rep is None or rep.step is None else str(rep.step)
        detail = "" if rep is None else rep.detail
        stacks = []
        for label, dump in (
            ("stack", None if ev is None else ev.stack),
            ("native stack", None if ev is None else ev.native_stack),
        ):
            if dump is not None:
                stacks.append(
                    f"<details><summary>full {label} (pid {dump.pid}, {len(dump.threads)} threads)</summary>"
                    f"<pre>{_e(_stack_text(dump))}</pre></details>"
                )
        if ev is not None and ev.stack is None:
            stacks.append('<p class="muted">no stack was taken</p>')
        cls = ' class="culprit"' if r in d.culprit_ranks else ""
        culprit = " (culprit)" if r in d.culprit_ranks else ""
        rows.append(
            f'<tr{cls} data-rank="{r}"><th>rank {r}{culprit}</th><td>{_e(state)}</td><td>{_e(step)}</td>'
            f"<td>{_e(key)}</td><td>{_e(detail)}{''.join(stacks)}</td></tr>"
        )
    if s.engine is not None and s.engine.stack is not None:
        full = _e(_stack_text(s.engine.stack))
        rows.append(
            f'<tr data-rank="engine"><th>engine</th><td colspan="3">pid {s.engine.pid}</td>'
            f"<td><details><summary>full stack</summary><pre>{full}</pre></details></td></tr>"
        )
    return (
        '<section id="ranks"><h2>Ranks</h2><table class="ranks"><tr><th>rank</th><th>state</th><th>step</th>'
        f"<th>graph key</th><th>where (stack summary)</th></tr>{''.join(rows)}</table></section>"
    )


def _rings(s: Snapshot, d: Diagnosis) -> str:
    if d.rings is None and not s.rings:
        return '<section id="rings"><h2>Shared-memory rings</h2><p class="muted">no ring was read</p></section>'
    head = "" if d.rings is None else f"<p><b>{_e(d.rings.kind)}</b>: {_e(d.rings.summary)}</p>"
    rows = []
    for ring in s.rings:
        unread = ", ".join(f"reader {i}: {ring.unread_by(i)}" for i in range(ring.n_readers))
        written = sum(1 for ch in ring.chunks if ch.written)
        rows.append(
            f"<tr><td>{_e(ring.role)}</td><td>{_e(ring.name)}</td><td>{written}/{len(ring.chunks)}</td>"
            f"<td>{_e(unread)}</td></tr>"
        )
    table = (
        (
            "<table><tr><th>role</th><th>segment</th><th>chunks written</th><th>written, unread</th></tr>"
            + "".join(rows)
            + "</table>"
        )
        if rows
        else ""
    )
    return f'<section id="rings"><h2>Shared-memory rings</h2>{head}{table}</section>'


def supervisor_section(d: Diagnosis, info: Mapping[str, Any] | None) -> str:
    """The recommendation, and what `watchdog run` did: its ladder decision and restarts, when known."""
    rec = d.recommendation
    action = rec.action + (f" &rarr; cudagraph_mode={_e(rec.cudagraph_mode)}" if rec.cudagraph_mode else "")
    why = " &mdash; " + _e(rec.reason) if rec.reason else ""
    out = [
        f'<section id="recommendation"><h2>Recommendation</h2><p><b>{action}</b>{why}</p>'
        "<h3>What <code>watchdog run</code> did</h3>"
    ]
    if not info:
        out.append(
            '<p class="muted" id="run-actions">not recorded: this incident was not decided on by '
            "<code>watchdog run</code> (or its decision was not saved with the bundle)</p>"
        )
    else:
        ev = info.get("event") or {}
        lines = []
        if ev:
            lines.append(f"{ev.get('action')}: {ev.get('from_mode')} \u2192 {ev.get('to_mode')} ({ev.get('reason')})")
        for r in info.get("restarts") or ():
            down = "?" if r.get("downtime_s") is None else f"{r['downtime_s']:.1f} s"
            lines.append(f"restart after {r.get('after_incident')}: {r.get('from')} \u2192 {r.get('to')}, down {down}")
        lad = info.get("ladder") or {}
        if lad:
            rungs = " \u2192 ".join(f"[{m}]" if m == lad.get("mode") else m for m in lad.get("ladder", ()))
            gave = "; gave up (restart bound hit)" if lad.get("gave_up") else ""
            lines.append(f"ladder {rungs}, rung {lad.get('rung')}{gave}")
        out.append(f'<div id="run-actions">{_items(lines, "nothing recorded")}</div>')
    out.append("</section>")
    return "".join(out)


def render_page(
    snapshot: Snapshot, diagnosis: Diagnosis, ctx: PageContext | None = None, steps: int = DEFAULT_STEPS
) -> str:
    ctx = ctx or PageContext()
    d = diagnosis
    tl = build(snapshot, d, steps)
    title = (
        f"{d.verdict.value}"
        + (f" at step {d.step}" if d.step is not None else "")
        + (f" \u2014 {ctx.incident}" if ctx.incident else "")
    )
    novelty = _items(d.novelty, "nothing new found about this step (or no stuck step)")
    missing = _items(d.missing, "nothing: every source answered")
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>',
        _banner(snapshot, d, ctx),
        f'<section id="picture"><h2>Every rank\'s last steps</h2><div class="scroll">{render_svg(tl)}</div>'
        f"{legend(tl)}</section>",
        _divergence(d),
        f'<section id="novelty"><h2>What is new about the stuck step</h2>{novelty}</section>',
        _rings(snapshot, d),
        _ranks(snapshot, d),
        f'<section id="missing" class="box"><h2>Missing evidence</h2>{missing}</section>',
        f'<section id="evidence"><h2>Evidence</h2>{_items(d.evidence, "none")}</section>',
        supervisor_section(d, ctx.supervisor),
        f'<p class="muted">rules fired: {_e(", ".join(f.rule for f in d.findings) or "none")}; '
        f"{_e(ctx.incident or 'incident')}</p>",
        f'<div id="tip" role="tooltip"></div><script>{JS}</script></body></html>',
    ]
    return "\n".join(p for p in parts if p) + "\n"


def render_index(rows: Sequence[Mapping[str, Any]]) -> str:
    """The incident list, newest first: rows of {id, verdict, culprit_ranks, step, time (wall s)}."""
    body = []
    for r in rows:
        culprits = ", ".join(map(str, r.get("culprit_ranks") or ())) or "-"
        step = "-" if r.get("step") is None else r["step"]
        when = _when(int(float(r.get("time") or 0) * 1e9))
        body.append(
            f'<tr><td><a href="/incidents/{_e(r["id"])}">{_e(r["id"])}</a></td><td>{_e(r["verdict"])}</td>'
            f"<td>{_e(culprits)}</td><td>{_e(step)}</td><td>{_e(when)}</td></tr>"
        )
    table = (
        (
            "<table><tr><th>incident</th><th>verdict</th><th>culprit</th><th>step</th><th>time</th></tr>"
            + "".join(body)
            + "</table>"
        )
        if body
        else '<p class="muted">no incident so far</p>'
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>incidents</title><style>{CSS}</style>'
        f'</head><body><h1>Incidents</h1><p class="muted">newest first</p>{table}</body></html>\n'
    )

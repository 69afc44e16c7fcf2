"""The human report: what an on-call engineer reads first."""

from __future__ import annotations

from watchdog.types import Diagnosis


def render(d: Diagnosis) -> str:
    lines: list[str] = []
    head = f"VERDICT  {d.verdict.value}"
    if d.step is not None:
        head += f" at step {d.step}"
    if d.culprit_ranks:
        head += f"  culprit rank {', '.join(map(str, d.culprit_ranks))}"
    lines += [head, f"  {d.summary}", ""]
    if d.ranks:
        lines.append("RANKS")
        for r, rep in sorted(d.ranks.items()):
            key = rep.graph_key.label() if rep.graph_key else "-"
            drafter = f"  drafter {rep.drafter_key.label()}" if rep.drafter_key else ""
            padded = f"  padded_slots={rep.padded_reqs}" if rep.padded_reqs else ""
            step = "-" if rep.step is None else str(rep.step)
            lines.append(f"  rank {r}  {rep.state.value:<18} step {step:<6} {key}{padded}{drafter}")
            if rep.detail:
                lines.append(f"          {rep.detail}")
        lines.append("")
    div = d.first_divergence
    if div is not None:
        lines.append(f"FIRST DIVERGENCE  step {div.step}, collective #{div.index}")
        for r, op in sorted(div.per_rank.items()):
            what = "none" if op is None else f"{op.op} group={op.group} {op.dtype} x{op.numel}"
            lines.append(f"  rank {r}: {what:<40} <- {div.sources.get(r, '?')}")
        lines.append("")
    if d.novelty:
        lines.append("WHAT IS NEW ABOUT THIS STEP")
        lines += [f"  - {n}" for n in d.novelty]
        lines.append("")
    if d.evidence:
        lines.append("EVIDENCE")
        lines += [f"  - {e}" for e in d.evidence]
        lines.append("")
    if d.missing:
        lines.append("MISSING EVIDENCE")
        lines += [f"  - {m}" for m in d.missing]
        lines.append("")
    rec = d.recommendation
    action = rec.action + (f" -> cudagraph_mode={rec.cudagraph_mode}" if rec.cudagraph_mode else "")
    lines.append(f"RECOMMENDATION  {action}" + (f"  ({rec.reason})" if rec.reason else ""))
    return "\n".join(lines) + "\n"

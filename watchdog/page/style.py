"""The page's inline style sheet and its few lines of optional script (hover details)."""

from __future__ import annotations

from watchdog.page import colors as c

_RULES = (
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;"
    f"color:{c.INK};background:{c.PAPER};margin:0 auto;max-width:1140px;padding:12px 18px}}",
    "h1{font-size:22px;margin:0 0 4px}",
    "h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ccc}",
    "h3{font-size:15px;margin:10px 0 4px}",
    f".banner{{padding:12px 16px;border-left:8px solid {c.ALERT};background:{c.CULPRIT_BG}}}",
    ".banner.unsure{border-left-color:#8A6100;background:#FFF4D6}",
    ".banner.fine{border-left-color:#1B6E3A;background:#E8F5EC}",
    ".facts{display:flex;flex-wrap:wrap;gap:4px 22px}",
    f".k,.muted{{color:{c.MUTED}}}",
    "table{border-collapse:collapse;margin:6px 0}",
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}",
    f"tr.culprit th,th.culprit{{color:{c.ALERT}}}",
    "td.diff{background:#FFF4D6;font-weight:bold}",
    "pre{font-size:12px;background:#F4F4F4;padding:6px;overflow-x:auto}",
    ".box{border:2px solid #8A6100;padding:4px 12px;background:#FFF4D6}",
    ".legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 18px}",
    f".sw{{display:inline-block;min-width:42px;padding:0 4px;border:1px solid {c.INK};"
    "text-align:center;font:12px monospace}",
    f".sw.pad{{background:repeating-linear-gradient(45deg,{c.INK} 0 3px,{c.PAPER} 3px 6px)}}",
    f".sw.open{{border:3px dashed {c.ALERT}}}",
    "svg text{font-family:system-ui,sans-serif}",
    f".ax{{font-size:12px;fill:{c.INK}}}",
    ".ln{font-size:14px;font-weight:bold} .ls{font-size:12px} .bl{font-size:12px;font-family:monospace}",
    f"#tip{{position:fixed;display:none;max-width:520px;background:{c.INK};color:{c.PAPER};"
    "padding:6px 8px;font-size:12px;pointer-events:none}",
    ".scroll{overflow-x:auto}",
)
CSS = "\n".join(_RULES)

# Browsers show an SVG <title> as a tooltip after a delay; this shows the same text at once.
JS = """
(function(){var tip=document.getElementById('tip');
document.querySelectorAll('[data-tip]').forEach(function(g){
g.addEventListener('mousemove',function(e){tip.textContent=g.getAttribute('data-tip');tip.style.display='block';
tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';});
g.addEventListener('mouseleave',function(){tip.style.display='none';});});})();
"""

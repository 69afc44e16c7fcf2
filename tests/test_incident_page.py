"""The incident page, opened in a real headless Chromium.

Pages are made from real incidents: the golden bundles (real demo hangs of every fault class), a
bundle with a rank's ledger removed, a post-mortem on a raw ledger directory, a TP=8 deployment
written through the real Recorder, and one freshly run demo incident (its bundle's incident.html).
Each is checked in the DOM Chromium built (verdict, culprit lane, the divergent collective) and,
for the golden bundles, in a screenshot that must not be blank.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from collectors.format import CUDAGraphMode, GraphKey
from tests import browser
from tests.factory import Deployment
from tests.helpers import DIVERGENT_WORKLOAD, demo, run_cli
from watchdog.analyzer import diagnose
from watchdog.bundle import load_snapshot, load_supervisor, record_supervisor
from watchdog.cli import main
from watchdog.incident import Incident
from watchdog.page import colors, render_index, render_page
from watchdog.types import StallInfo

SCENARIOS = Path(__file__).parent / "scenarios"
NAMES = sorted(p.name for p in SCENARIOS.iterdir() if (p / "expected.json").is_file())

pytestmark = pytest.mark.timeout(600)


def page_of(source: Path, out: Path) -> Path:
    rc = main(["diagnose", str(source), "--html", str(out)])
    assert rc in (0, 3, 4) and out.is_file()
    return out


def lanes(dom: browser.Node) -> dict[str, browser.Node]:
    return {g.attrs["data-rank"]: g for g in dom.find("g", class_="lane")}


def check_page(dom: browser.Node, d: dict[str, Any]) -> None:
    """What any page must show of its diagnosis (``d``: Diagnosis JSON)."""
    (banner,) = dom.find(id="verdict")
    assert banner.attrs["data-verdict"] == d["verdict"]
    assert d["verdict"] in banner.all_text()
    drawn = lanes(dom)
    assert "engine" in drawn
    for r in d["ranks"]:
        assert ("culprit" in drawn[r].classes) == (int(r) in d["culprit_ranks"]), r
        if int(r) in d["culprit_ranks"]:
            assert "culprit" in drawn[r].all_text()
    div = d["first_divergence"]
    if div is not None:
        (table,) = dom.find(id="divergence")
        text = table.all_text()
        assert f"collective #{div['index']}" in text
        for r, op in div["per_rank"].items():
            assert f"rank {r}" in text
            assert (str(op["numel"]) if op else "none") in text
            assert div["sources"][r] in text
    # no resource from elsewhere: it must open offline from a copied bundle
    for node in dom.find():
        for attr in ("src", "href"):
            assert not node.attrs.get(attr, "").startswith(("http:", "https:", "//")), node.attrs


@pytest.mark.parametrize("name", NAMES)
def test_golden_incident_page_in_chromium(tmp_path: Path, name: str) -> None:
    expected = json.loads((SCENARIOS / name / "expected.json").read_text())
    page = page_of(SCENARIOS / name, tmp_path / "incident.html")
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    d = diagnose(load_snapshot(SCENARIOS / name)).to_json()
    assert d["verdict"] == expected["verdict"] and d["culprit_ranks"] == expected["culprit_ranks"]
    check_page(dom, d)
    # every rank lane has the step bars of its ledger; where a rank's step never ended it is drawn open
    drawn = lanes(dom)
    for r, rep in d["ranks"].items():
        assert drawn[r].find("g", class_="bar"), r
        if rep["state"] in ("waiting_collective", "waiting_device", "host_busy", "dead"):
            assert drawn[r].find("g", class_="open"), r
    if d["first_divergence"] is None:
        assert not dom.find(id="divergence")
    if d["verdict"] == "engine_stall":  # the step the engine never sent is drawn open on its lane
        (never,) = drawn["engine"].find("g", class_="open")
        assert "never dispatched" in never.all_text() and "NOT DISPATCHED" in never.all_text().upper()
    # the full stacks are there, folded
    assert any(det.find("pre") for det in dom.find("details"))
    png = browser.screenshot(page.as_uri(), tmp_path / "shot.png", 1160, 700)
    width, height, n_colours, ink = browser.png_stats(png)
    assert (width, height) == (1160, 700)
    assert n_colours >= 20 and ink >= 0.08, (n_colours, ink)


def test_missing_rank_and_post_mortem_pages(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(SCENARIOS / "graph-key-divergence", bundle)
    (bundle / "ledgers" / "rank001.ledger").unlink()
    d = diagnose(load_snapshot(bundle)).to_json()
    dom = browser.parse(browser.dump_dom(page_of(bundle, tmp_path / "missing.html").as_uri()))
    check_page(dom, d)
    lane = lanes(dom)["1"]
    assert "no ledger" in lane.all_text() and not lane.find("g", class_="bar")
    (box,) = dom.find(id="missing")
    assert "rank 1" in box.all_text()

    # a dead deployment's ledger directory alone: no stacks, no rings, said so; the cause stays open
    raw = SCENARIOS / "engine-stall" / "ledgers"
    d = diagnose(load_snapshot(raw)).to_json()
    assert d["verdict"] == "inconclusive"
    dom = browser.parse(browser.dump_dom(page_of(raw, tmp_path / "pm.html").as_uri()))
    check_page(dom, d)
    (banner,) = dom.find(id="verdict")
    assert "post-mortem on ledgers alone" in banner.all_text()
    assert "post-mortem" in dom.find(id="missing")[0].all_text()


def test_tp8_page(tmp_path: Path) -> None:
    """Eight ranks written by the real Recorder; rank 6's drafter ran another graph at the stuck step."""
    dep = Deployment(tmp_path, tp=8)
    for step in range(12):
        dep.decode_step(step, reqs=16)
        time.sleep(0.003)  # steps that take time, as drawn bars
    dep.decode_step(12, reqs=16, open_on=[0, 1, 2, 3, 4, 5, 7], drafter_override={6: 24})
    snap = dep.snapshot(
        host={r: ("ring" if r == 6 else "sync") for r in range(8)},
        device={r: ("idle" if r == 6 else "collective") for r in range(8)},
        stall=StallInfo("open_step", 12, 2.0, 1.0),
    )
    diagnosis = diagnose(snap)
    d = diagnosis.to_json()
    assert d["verdict"] == "collective_mismatch" and d["culprit_ranks"] == [6]
    page = tmp_path / "tp8.html"
    page.write_text(render_page(snap, diagnosis))
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    check_page(dom, d)
    drawn = lanes(dom)
    assert sorted(drawn) == [*map(str, range(8)), "engine"]
    for r in range(8):
        bars = {b.attrs["data-step"] for b in drawn[str(r)].find("g", class_="bar")}
        assert bars == {str(s) for s in range(5, 13)}, r  # the last 8 steps
        assert bool(drawn[str(r)].find("g", class_="open")) == (r != 6)
    # the culprit's drafter key is named on its bar, not only coloured
    (stuck,) = [b for b in drawn["6"].find("g", class_="bar") if b.attrs["data-step"] == "12"]
    assert "drafter PIECEWISE(tokens=24)" in stuck.all_text()


@pytest.mark.slow
def test_fresh_tp8_demo_incident_page(tmp_path: Path) -> None:
    """A real TP=8 deployment (eight worker processes) whose rank 5 hangs in host code."""
    # a light workload: at TP=8 on two cores the default one's prefills take seconds a step
    light = ("--requests", "16", "--concurrency", "8", "--input-len", "32", "--output-len", "8")
    result, _ = demo(tmp_path, "--tp", "8", "--fault", "host-hang", "--fault-rank", "5", *light, timeout=400)
    (inc,) = result["incidents"]
    d = inc["diagnosis"]
    assert d["verdict"] == "host_hang" and d["culprit_ranks"] == [5]
    dom = browser.parse(browser.dump_dom((Path(inc["bundle"]) / "incident.html").as_uri()))
    check_page(dom, d)
    drawn = lanes(dom)
    assert sorted(drawn) == [*map(str, range(8)), "engine"]
    for r in range(8):  # the stuck step never ended on any rank: the culprit holds it, its peers wait in it
        (stuck,) = drawn[str(r)].find("g", class_="open")
        assert stuck.attrs["data-step"] == str(d["step"])


@pytest.mark.slow
def test_fresh_demo_incident_page_and_supervisor_record(tmp_path: Path) -> None:
    """A real hang, culprit rank 2 of 3; the page the watcher wrote into the bundle."""
    args = ("--tp", "3", "--fault", "graph-key-divergence", "--fault-rank", "2", *DIVERGENT_WORKLOAD)
    result, _ = demo(tmp_path, *args, timeout=240)
    (inc,) = result["incidents"]
    bundle = Path(inc["bundle"])
    d = inc["diagnosis"]
    assert d["culprit_ranks"] == [2]
    page = bundle / "incident.html"
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    check_page(dom, d)
    assert dom.find(id="divergence")
    assert "not recorded" in dom.find(id="run-actions")[0].all_text()
    (diagnosed,) = dom.find("b", data_field="diagnosed")
    assert diagnosed.all_text().endswith("s after detection")

    # what `watchdog run` decides is kept with the bundle and redrawn into its page
    diagnosis = diagnose(load_snapshot(bundle))
    info = {
        "event": {"action": "climb", "from_mode": "FULL_AND_PIECEWISE", "to_mode": "FULL_DECODE_ONLY", "reason": "r"},
        "ladder": {"ladder": ["FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "NONE"], "mode": "FULL_DECODE_ONLY", "rung": 1},
    }
    record_supervisor(Incident(diagnosis, bundle, "", None, 0, 1), info)
    assert load_supervisor(bundle) == info
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    text = dom.find(id="run-actions")[0].all_text()
    assert "climb: FULL_AND_PIECEWISE \u2192 FULL_DECODE_ONLY" in text and "[FULL_DECODE_ONLY]" in text
    cp = run_cli(["diagnose", str(bundle), "--html", str(tmp_path / "again.html")], timeout=60)
    assert cp.returncode == 3 and "climb" in (tmp_path / "again.html").read_text()


def test_healthy_page_and_the_incident_list(tmp_path: Path) -> None:
    """A diagnosis asked for on a healthy deployment draws too; the list is newest first, each row a link."""
    dep = Deployment(tmp_path, tp=2)
    for step in range(4):
        dep.decode_step(step, reqs=8)
    dep.engine_result(3, running=0)  # every request finished
    snap = dep.snapshot(host={0: "ring", 1: "ring"}, device={0: "idle", 1: "idle"})
    diagnosis = diagnose(snap)
    assert diagnosis.verdict.value == "no_deadlock"
    page = tmp_path / "ok.html"
    page.write_text(render_page(snap, diagnosis))
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    check_page(dom, diagnosis.to_json())
    assert not dom.find("g", class_="open")

    rows = [
        {"id": "20261202T100000Z-host_hang-aaaaaa", "verdict": "host_hang", "culprit_ranks": [1], "step": 9},
        {"id": "20261202T090000Z-worker_dead-bbbbbb", "verdict": "worker_dead", "culprit_ranks": [3], "step": 5},
    ]
    index = tmp_path / "index.html"
    index.write_text(render_index(rows))
    links = [a.attrs["href"] for a in browser.parse(browser.dump_dom(index.as_uri())).find("a")]
    assert links == [f"/incidents/{r['id']}" for r in rows]


def test_bad_html_path_is_one_line(tmp_path: Path) -> None:
    cp = run_cli(["diagnose", str(SCENARIOS / "host-hang"), "--html", str(tmp_path / "no" / "such" / "x.html")], 60)
    assert cp.returncode == 1
    assert cp.stderr.count("\n") == 1 and "cannot write the page" in cp.stderr and "Traceback" not in cp.stderr


def test_text_contrast() -> None:
    """WCAG AA (4.5:1) for every text on every background the page uses."""
    for fill in (*colors.PALETTE, colors.ENGINE, colors.MISSING_BG):
        assert colors.contrast(colors.text_on(fill), fill) >= colors.MIN_CONTRAST, fill
    for ink in (colors.INK, colors.MUTED, colors.ALERT):
        for bg in (colors.PAPER, colors.CULPRIT_BG, "#F7F7F7", "#FFF4D6", "#E8F5EC"):
            assert colors.contrast(ink, bg) >= colors.MIN_CONTRAST, (ink, bg)
    assert colors.short_key(GraphKey(CUDAGraphMode.FULL, 64, 32, uniform=True)) == "F64/32"

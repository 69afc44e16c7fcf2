"""Generate the Grafana dashboard and the Prometheus alert rules from one place.

    python dashboards/generate.py           # (re)write the committed files
    python dashboards/generate.py --check   # exit 1 if a committed file differs from what this generates

Outputs:
  dashboards/watchdog.json               the Grafana dashboard (grafana-foundation-sdk 11.x builders)
  dashboards/watchdog-rules.yaml         the alert rules, a plain Prometheus rule file (promtool, Prometheus)
  deploy/base/prometheusrule.yaml        the same rules as a prometheus-operator PrometheusRule

Metric names are the agent's (``watchdog/metrics.py``), the supervisor's (``watchdog run``:
``watchdog_supervisor_*``) and vLLM's own (``vllm:*``). Every expression here is also run by
``tests/test_dashboards.py`` against a real Prometheus that scraped a real agent and demo server.

Why one module: about 500 lines, most of them the panels and rules themselves, a table read top to
bottom beside the few builders that turn it into the three files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_JSON = ROOT / "dashboards" / "watchdog.json"
RULES_YAML = ROOT / "dashboards" / "watchdog-rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "base" / "prometheusrule.yaml"

DASHBOARD_UID = "tp-deadlock-watchdog"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every watchdog series in the dashboard is narrowed by the three template variables.
SEL = 'namespace=~"$namespace", pod=~"$pod", tp_group=~"$tp_group"'
# vLLM's own metrics carry no tp_group: the pod is the TP group's front.
VSEL = 'namespace=~"$namespace", pod=~"$pod"'
BY = "namespace, pod, tp_group"
DEADLOCK_VERDICTS = "collective_mismatch|device_hang|host_hang|worker_dead|engine_stall"


# ---- alert rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    needs: str = ""  # "" (the agent), "supervisor" (watchdog run), "vllm" (vLLM's /metrics scraped too)

    def rule(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_:
            out["for"] = self.for_
        out["labels"] = {"severity": self.severity}
        out["annotations"] = {"summary": self.summary, "description": self.description}
        return out


ALERTS = (
    Alert(
        "WatchdogStallDetected",
        f"sum by ({BY}) (increase(watchdog_stalls_detected_total[5m])) > 0",
        "",
        "warning",
        "TP group {{ $labels.tp_group }} in {{ $labels.namespace }}/{{ $labels.pod }}: a step stalled",
        "The watchdog declared a stall (a step older than its adaptive deadline) in the last 5 minutes. "
        "A diagnosis follows within seconds: see WatchdogDeadlockDiagnosed and the agent's /v1/incidents.",
    ),
    Alert(
        "WatchdogDeadlockDiagnosed",
        # A verdict's counter series is born at 1 with its first incident, and increase() never counts a
        # series' first sample: the `unless ... offset` arm catches a verdict seen for the first time.
        f"sum by ({BY}, verdict) (\n"
        f'  increase(watchdog_incidents_total{{verdict=~"{DEADLOCK_VERDICTS}"}}[10m]) > 0\n'
        f'  or (watchdog_incidents_total{{verdict=~"{DEADLOCK_VERDICTS}"}}\n'
        f'      unless watchdog_incidents_total{{verdict=~"{DEADLOCK_VERDICTS}"}} offset 10m)\n'
        ") > 0",
        "",
        "critical",
        "{{ $labels.namespace }}/{{ $labels.pod }} deadlocked: {{ $labels.verdict }}",
        "The watchdog diagnosed a deadlock ({{ $labels.verdict }}) in TP group {{ $labels.tp_group }}. "
        "The incident bundle (ranks, first divergent collective, stacks) is in the agent's incidents "
        "directory; `watchdog diagnose <bundle>` re-renders it. The vLLM container's liveness probe "
        "(the agent's /livez) restarts vLLM after its failureThreshold.",
    ),
    Alert(
        "WatchdogNoStepProgress",
        "(max by (namespace, pod) (min_over_time(vllm:num_requests_running[2m])) > 0)\n"
        "and on (namespace, pod)\n"
        "(max by (namespace, pod) (changes(watchdog_rank_last_step[2m])) == 0)",
        "1m",
        "critical",
        "{{ $labels.namespace }}/{{ $labels.pod }}: requests running, no step began for 3 minutes",
        "vLLM reports requests running (vllm:num_requests_running > 0 throughout) while no rank began a "
        "step: the server is stuck whether or not the watchdog's detector fired (agent deadlines, "
        "missing ledgers).",
        needs="vllm",
    ),
    Alert(
        "WatchdogFallbackLadderClimbed",
        "max by (namespace, pod, tp_group, mode) (\n"
        "  (watchdog_supervisor_cudagraph_mode == 1) and (changes(watchdog_supervisor_cudagraph_mode[30m]) > 0)\n"
        ")",
        "",
        "warning",
        "{{ $labels.namespace }}/{{ $labels.pod }} fell back to cudagraph_mode {{ $labels.mode }}",
        "watchdog run restarted the server at a different rung of the cudagraph ladder after a diagnosed "
        "deadlock. The server is up, but slower: find the incident and fix the cause.",
        needs="supervisor",
    ),
    Alert(
        "WatchdogRestartBudgetExhausted",
        f"max by ({BY}) (watchdog_supervisor_gave_up) == 1",
        "",
        "critical",
        "{{ $labels.namespace }}/{{ $labels.pod }}: restart budget exhausted, the watchdog stopped restarting",
        "watchdog run hit max_restarts within restart_window_s; the server is stopped (on_give_up=stop) "
        "or left up as it is (on_give_up=up). A person has to look.",
        needs="supervisor",
    ),
    Alert(
        "WatchdogAgentDown",
        'up{job="watchdog"} == 0',
        "5m",
        "warning",
        "watchdog agent {{ $labels.namespace }}/{{ $labels.pod }} is not answering scrapes",
        "No deadlock detection for this pod. While the agent is down the vLLM container's liveness "
        "probe (the agent's /livez) fails too: after its failureThreshold the kubelet restarts vLLM.",
    ),
)


def rule_groups() -> dict[str, Any]:
    return {"groups": [{"name": "tp-deadlock-watchdog", "rules": [a.rule() for a in ALERTS]}]}


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tp-deadlock-watchdog",
            "labels": {"app.kubernetes.io/name": "tp-deadlock-watchdog", "app.kubernetes.io/component": "alerts"},
        },
        "spec": rule_groups(),
    }


# ---- dashboard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    needs: str = ""  # "" (the agent), "supervisor", "vllm", "gpu" (NVML gauges: only on GPU nodes)


def _target(q: Query, ref: str) -> pb.Dataquery:
    return pb.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DS)


def _timeseries(title: str, desc: str, unit: str, queries: list[Query], stack: bool = False) -> timeseries.Panel:
    p = timeseries.Panel().title(title).description(desc).unit(unit).datasource(DS)
    for i, q in enumerate(queries):
        p = p.with_target(_target(q, chr(ord("A") + i)))
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(60)
    return p


PANELS: list[tuple[str, str, str, list[Query], str]] = []  # title, description, unit, queries, kind


def _panel_specs() -> list[tuple[str, str, str, list[Query], str]]:
    r = "$__rate_interval"
    return [
        (
            "Deadlocked",
            "1 while the watchdog holds a deadlock verdict for the TP group (the agent's /livez answers 503).",
            "none",
            [Query(f"max by ({BY}) (watchdog_deadlocked{{{SEL}}})", "{{pod}} {{tp_group}}")],
            "stat",
        ),
        (
            "Step progress per rank",
            "Steps begun per second by each rank. A rank that stops while its peers go on is the culprit of a "
            "collective mismatch; all ranks flat with requests running is a hang.",
            "ops",
            [Query(f"rate(watchdog_rank_last_step{{{SEL}}}[{r}])", "{{pod}} rank {{rank}}")],
            "timeseries",
        ),
        (
            "Open-step age per rank",
            "Age of the step each rank is inside now (0: between steps). Grows without bound in a hang.",
            "s",
            [Query(f"watchdog_rank_open_step_age_seconds{{{SEL}}}", "{{pod}} rank {{rank}}")],
            "timeseries",
        ),
        (
            "Step duration by mode (p50, p99)",
            "Step durations seen in the ledgers, by CUDA-graph mode (FULL, PIECEWISE, NONE = eager).",
            "s",
            [
                Query(
                    "histogram_quantile(0.5, sum by (le, mode) "
                    f"(rate(watchdog_step_duration_seconds_bucket{{{SEL}}}[{r}])))",
                    "p50 {{mode}}",
                ),
                Query(
                    "histogram_quantile(0.99, sum by (le, mode) "
                    f"(rate(watchdog_step_duration_seconds_bucket{{{SEL}}}[{r}])))",
                    "p99 {{mode}}",
                ),
            ],
            "timeseries",
        ),
        (
            "Graph-key dispatch mix (mode x size)",
            "Model forwards per second by CUDA-graph mode and token bucket (next power of two).",
            "ops",
            [
                Query(
                    f"sum by (mode, size_bucket) (rate(watchdog_graph_dispatches_total{{{SEL}}}[{r}]))",
                    "{{mode}} {{size_bucket}}",
                )
            ],
            "stacked",
        ),
        (
            "Stalls, divergences and incidents by verdict",
            "Stalls the detector declared, ranks caught out of step as their steps completed (before any "
            "stall: no other tool sees this), and incidents the analyzer diagnosed, by verdict.",
            "short",
            [
                Query(f"sum by (tp_group) (increase(watchdog_stalls_detected_total{{{SEL}}}[{r}]))", "stalls"),
                Query(
                    f"sum by (tp_group) (increase(watchdog_divergences_detected_total{{{SEL}}}[{r}]))",
                    "divergences (no stall yet)",
                ),
                Query(f"sum by (verdict) (increase(watchdog_incidents_total{{{SEL}}}[{r}]))", "{{verdict}}"),
                Query(f"sum by (verdict) (watchdog_incidents_total{{{SEL}}})", "{{verdict}} (total)"),
            ],
            "timeseries",
        ),
        (
            "Fallback rung (cudagraph mode)",
            "The cudagraph mode watchdog run runs the server at, over time (only with `watchdog run`).",
            "none",
            [
                Query(
                    f"max by (mode) (watchdog_supervisor_cudagraph_mode{{{SEL}}}) == 1",
                    "{{mode}}",
                    needs="supervisor",
                ),
                Query(
                    f"sum by (mode) (increase(watchdog_supervisor_restarts_total{{{SEL}}}[{r}]))",
                    "restarts into {{mode}}",
                    needs="supervisor",
                ),
            ],
            "statetimeline",
        ),
        (
            "Evidence collection time",
            "Stall declared to diagnosis written (py-spy stacks, process state, NVML, ring flags, analysis).",
            "s",
            [
                Query(
                    "histogram_quantile(0.99, sum by (le, tp_group) "
                    f"(rate(watchdog_evidence_collection_seconds_bucket{{{SEL}}}[{r}])))",
                    "p99 {{tp_group}}",
                ),
                Query(
                    f"sum by (tp_group) (watchdog_evidence_collection_seconds_sum{{{SEL}}}) / "
                    f"sum by (tp_group) (watchdog_evidence_collection_seconds_count{{{SEL}}})",
                    "mean {{tp_group}}",
                ),
            ],
            "timeseries",
        ),
        (
            "GPU utilization per rank",
            "NVML utilization of each rank's GPU. 100 % with no step progress is a device-side hang.",
            "percent",
            [Query(f"watchdog_gpu_utilization_percent{{{SEL}}}", "{{pod}} rank {{rank}} gpu {{gpu}}", "gpu")],
            "timeseries",
        ),
        (
            "GPU power per rank",
            "NVML power draw of each rank's GPU.",
            "watt",
            [Query(f"watchdog_gpu_power_watts{{{SEL}}}", "{{pod}} rank {{rank}} gpu {{gpu}}", "gpu")],
            "timeseries",
        ),
        (
            "vLLM requests running / waiting",
            "vLLM's own scheduler gauges, next to the watchdog's view of the same pods.",
            "short",
            [
                Query(f"sum by (pod) (vllm:num_requests_running{{{VSEL}}})", "running {{pod}}", "vllm"),
                Query(f"sum by (pod) (vllm:num_requests_waiting{{{VSEL}}})", "waiting {{pod}}", "vllm"),
            ],
            "timeseries",
        ),
        (
            "vLLM generation throughput",
            "Generated tokens per second (vLLM's vllm:generation_tokens_total).",
            "short",
            [Query(f"sum by (pod) (rate(vllm:generation_tokens_total{{{VSEL}}}[{r}]))", "{{pod}}", "vllm")],
            "timeseries",
        ),
        (
            "Incidents",
            "The newest incidents, newest first; click an incident to open its page on the agent that diagnosed it "
            "(every rank's last steps, the first divergent collective, stacks, what watchdog run did).",
            "dateTimeAsIso",
            [
                Query(
                    f"max by ({BY}, instance, incident, verdict, step, culprit_ranks) "
                    f"(watchdog_incident_info{{{SEL}}}) * 1000",
                    "{{verdict}} {{incident}}",
                )
            ],
            "table",
        ),
    ]


def queries() -> list[Query]:
    """Every PromQL expression of the dashboard (the tests run each against a real Prometheus)."""
    return [q for _t, _d, _u, qs, _k in _panel_specs() for q in qs]


# The agent serves each incident's page at /incidents/<id>; Prometheus' instance label is the address
# it scraped the agent's /metrics at, so the link reaches the same agent.
INCIDENT_LINK = "http://${__data.fields.instance}/incidents/${__data.fields.incident}"


def _incidents_table(title: str, desc: str, unit: str, qs: list[Query]) -> table.Panel:
    p = table.Panel().title(title).description(desc).datasource(DS)
    for j, q in enumerate(qs):
        p = p.with_target(_target(q, chr(ord("A") + j)).instant().format(pm.PromQueryFormat.TABLE))
    p = p.with_transformation(
        dm.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": {"Time": True}, "renameByName": {"Value": "diagnosed at"}},
        )
    )
    p = p.override_by_name("diagnosed at", [dm.DynamicConfigValue(id_val="unit", value=unit)])
    link = {"title": "open the incident page", "url": INCIDENT_LINK, "targetBlank": True}
    p = p.override_by_name("incident", [dm.DynamicConfigValue(id_val="links", value=[link])])
    return p.sort_by([cb.TableSortByFieldState().display_name("diagnosed at").desc(True)])


def _query_variable(name: str, label: str, query: str) -> Any:
    """A multi-value template variable filled from a label's values (All = any)."""
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _variables() -> list[Any]:
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        _query_variable("namespace", "Namespace", "label_values(watchdog_deadlocked, namespace)"),
        _query_variable("pod", "Pod", 'label_values(watchdog_deadlocked{namespace=~"$namespace"}, pod)'),
        _query_variable(
            "tp_group",
            "TP group",
            'label_values(watchdog_deadlocked{namespace=~"$namespace", pod=~"$pod"}, tp_group)',
        ),
    ]


def variable_queries() -> list[str]:
    """The template variables' label_values() queries, for the tests."""
    return [
        "label_values(watchdog_deadlocked, namespace)",
        'label_values(watchdog_deadlocked{namespace=~"$namespace"}, pod)',
        'label_values(watchdog_deadlocked{namespace=~"$namespace", pod=~"$pod"}, tp_group)',
    ]


def build_dashboard() -> dict[str, Any]:
    d = (
        db.Dashboard("TP deadlock watchdog")
        .uid(DASHBOARD_UID)
        .description("Per-rank step progress, stalls, deadlock verdicts and fallbacks of tensor-parallel vLLM.")
        .tags(["vllm", "tensor-parallel", "watchdog"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
    )
    for v in _variables():
        d = d.with_variable(v)
    y, panel_id, open_row = 0, 1, False
    for i, (title, desc, unit, qs, kind) in enumerate(_panel_specs()):
        w, h = (24, 4) if kind == "stat" else (12, 8)
        x = 0 if kind == "stat" else (12 * ((i - 1) % 2))
        if kind == "stat":
            p: Any = stat.Panel().title(title).description(desc).unit(unit).datasource(DS)
            for j, q in enumerate(qs):
                p = p.with_target(_target(q, chr(ord("A") + j)))
        elif kind == "table":
            if open_row:  # the half-width panel before it is alone on its row
                y += 8
            w, x = 24, 0
            p = _incidents_table(title, desc, unit, qs)
        elif kind == "statetimeline":
            p = statetimeline.Panel().title(title).description(desc).unit(unit).datasource(DS)
            for j, q in enumerate(qs):
                p = p.with_target(_target(q, chr(ord("A") + j)))
        else:
            p = _timeseries(title, desc, unit, qs, stack=kind == "stacked")
        d = d.with_panel(p.id(panel_id).grid_pos(dm.GridPos(h=h, w=w, x=x, y=y)))
        panel_id += 1
        open_row = w == 12 and x == 0
        if not open_row:
            y += h
    data: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return data


# ---- output ------------------------------------------------------------------------------------

HEADER = "# Generated by dashboards/generate.py: edit that file and re-run it, not this one.\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, as a person would write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(data: dict[str, Any]) -> str:
    return HEADER + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)


def outputs() -> dict[Path, str]:
    return {
        DASHBOARD_JSON: json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n",
        RULES_YAML: _yaml(rule_groups()),
        PROMETHEUS_RULE: _yaml(prometheus_rule()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed file is not what this generates")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run python dashboards/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

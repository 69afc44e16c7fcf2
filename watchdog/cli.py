"""The ``watchdog`` command line.

Exit codes (all commands):
    0  ran fine; for diagnose: no deadlock found
    1  error or bad input (one line on stderr, never a traceback)
    2  usage error
    3  a deadlock was diagnosed
    4  diagnose: a stall or missing evidence, cause not determined (inconclusive)
    5  run (and demo): the fallback gave up, the restart bound was hit
  130  interrupted (Ctrl-C)

Data goes to stdout (``--json``: one stable, versioned JSON object as the last line); progress
and messages go to stderr.

Why one module: just over 400 lines, the product's commands and the wiring each needs (the
option machinery is in ``cli_options``, the demo's and the benches' commands live with them).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

try:  # recent typer releases vendor click; older ones use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc  # type: ignore[no-redef]

from collectors.reader import LedgerError
from watchdog.bench.cli import bench_app
from watchdog.cli_options import (
    EXIT_DEADLOCK,
    EXIT_ERROR,
    EXIT_INCONCLUSIVE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    GroupedCommand,
    err,
    version_callback,
    with_settings,
)
from watchdog.demo.cli import demo
from watchdog.errors import UsageError, WatchdogError
from watchdog.settings import AgentSettings, CoordinatorSettings, RunSettings
from watchdog.types import Verdict

if TYPE_CHECKING:
    from watchdog.agent import Agent
    from watchdog.incident import Incident
    from watchdog.metrics import AgentMetrics
    from watchdog.retention import Retention
    from watchdog.watcher import Watcher


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deadlock watchdog for tensor-parallel vLLM serving.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=version_callback, help="Print the version and exit.")
    ] = False,
) -> None:
    """Deadlock watchdog for tensor-parallel vLLM serving."""


def _verdict_exit(verdict: Verdict) -> int:
    if verdict.is_deadlock:
        return EXIT_DEADLOCK
    return EXIT_INCONCLUSIVE if verdict is Verdict.INCONCLUSIVE else EXIT_OK


@app.command(cls=GroupedCommand)
def diagnose(
    path: Annotated[Path, typer.Argument(help="An incident bundle, or a ledger directory of a dead deployment.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the Diagnosis as JSON.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the incident page (HTML) here.")] = None,
) -> int:
    """Re-run the analyzer on an incident bundle or a raw ledger directory."""
    from watchdog.analyzer import diagnose as run_analyzer
    from watchdog.bundle import load_snapshot, write_page
    from watchdog.report import render

    snapshot = load_snapshot(path)
    diagnosis = run_analyzer(snapshot)
    if html is not None:
        write_page(html, path, snapshot, diagnosis)
    if as_json:
        print(json.dumps(diagnosis.to_json(), sort_keys=False))
    else:
        print(render(diagnosis), end="")
    return _verdict_exit(diagnosis.verdict)


app.command(cls=GroupedCommand)(demo)  # the demo stands beside the product: its command lives with it


def _logging(s: AgentSettings | RunSettings | CoordinatorSettings) -> None:
    from watchdog import logs

    logs.setup(s.log_format, s.log_level)


@app.command(cls=GroupedCommand)
@with_settings(AgentSettings)
def agent(s: AgentSettings) -> int:
    """Watch this node's ranks as a long-running sidecar: HTTP API, /livez, /metrics.

    Single-node TP (the default) diagnoses here; with --member, a `watchdog coordinator` does."""
    from watchdog.agent import Agent
    from watchdog.api import serve
    from watchdog.metrics import AgentMetrics

    _logging(s)
    try:  # the ranks may start after the agent: make the directory they will write to, as run does
        s.ledger_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WatchdogError(f"ledger_dir {s.ledger_dir}: {exc.strerror or exc}") from None
    metrics = AgentMetrics(s.tp_group)
    watcher = _watchers(s, metrics)()
    role = "member" if s.member else "agent"
    agent = Agent(watcher, metrics, role=role, token=s.token(), poll_s=s.poll_interval_s)
    agent.on_incident = _kube_actions(s, metrics)
    _bounds(agent, s)
    serve(agent, s.host, s.port)
    return EXIT_OK


def _bounds(agent: Agent, s: AgentSettings | RunSettings | CoordinatorSettings) -> Retention:
    """Disk and rate bounds: incident retention, diagnose-now at most once per interval."""
    from watchdog.retention import Retention

    agent.retention = Retention(s.incidents_dir, s.max_incidents, s.max_incidents_mb * 2**20, agent.metrics.retained)
    agent.diagnose_now_interval_s = s.diagnose_now_interval_s
    return agent.retention


def _kube_actions(s: AgentSettings | CoordinatorSettings, metrics: AgentMetrics) -> Callable[[Incident], None] | None:
    """Kubernetes Events on incidents and/or evicting this pod on a deadlock, as configured; with
    kube_events, the log's state changes (start, rings, stall, ...) become Events too."""
    if s.on_deadlock != "evict" and not s.kube_events:
        return None
    from watchdog.kube import Kube, incident_actions
    from watchdog.logs import KubeEvents, log

    ca = s.kube_ca_file if s.kube_api.startswith("https") and s.kube_ca_file.exists() else None
    kube = Kube(s.kube_api, s.kube_token_file, ca, s.pod_namespace, s.pod_name)

    def failed() -> None:
        metrics.scrape_errors.labels(s.tp_group, "kube").inc()

    if s.kube_events:
        log.addHandler(KubeEvents(lambda reason, message, kind: kube.event(reason, message, kind), failed))
    return incident_actions(kube, s.kube_events, s.on_deadlock == "evict", failed)


def _watchers(s: AgentSettings | RunSettings, metrics: AgentMetrics) -> Callable[[], Watcher]:
    """A factory of Watchers over ``s.ledger_dir`` sharing one set of evidence sources and metrics."""
    from watchdog.detector import DetectorConfig
    from watchdog.evidence.gpus import Nvml
    from watchdog.evidence.procs import PsutilProcs
    from watchdog.snapshot import Sources
    from watchdog.watcher import Watcher

    # Every reader of /proc gets the root as an argument (wchan, comm, maps, fds, stat); psutil's own
    # status and CPU counters read the live /proc, which shows the same pids in a shared namespace.
    sources = Sources(
        gpus=Nvml(module=s.nvml_module) if s.nvml else None,
        procs=PsutilProcs(str(s.proc_root)),
        shm_dir=str(s.shm_dir),
        proc_root=str(s.proc_root),
        native=s.native_stacks,
        stack_timeout_s=s.stack_timeout_s,
        native_timeout_s=s.native_timeout_s,
    )
    detector = DetectorConfig(
        floor_s=s.stall_floor_s,
        multiplier=s.stall_multiplier,
        cold_deadline_s=s.cold_deadline_s,
        max_floor_s=s.stall_max_floor_s,
    )

    def make() -> Watcher:
        return Watcher(
            s.ledger_dir,
            s.incidents_dir,
            sources,
            detector,
            ranks=s.owned_ranks() if isinstance(s, AgentSettings) else None,  # run watches every ledger
            on_records=metrics.observe,
            on_error=lambda source: metrics.scrape_errors.labels(s.tp_group, source).inc(),
        )

    return make


@app.command(cls=GroupedCommand, context_settings={"allow_interspersed_args": False})
@with_settings(RunSettings)
def run(
    s: RunSettings,
    command: Annotated[list[str], typer.Argument(help="The server command, after --.", show_default=False)],
) -> int:
    """Run a server (`watchdog run [OPTIONS] -- vllm serve ...`), watch it, and on a diagnosed deadlock
    restart it one rung safer on the cudagraph ladder (bounded; --observe never restarts).

    Exits with the server's exit code when it ends by itself, 5 once the restart bound was hit."""
    from watchdog.api import serve_in_background
    from watchdog.logs import event as log_event
    from watchdog.metrics import AgentMetrics
    from watchdog.supervisor import ladder
    from watchdog.supervisor.proxy import ResumingProxy, UpstreamGate
    from watchdog.supervisor.run import Supervisor, SupervisorConfig, handle_signals

    _logging(s)
    if not command:
        raise WatchdogError("give the server command after --, e.g. watchdog run -- vllm serve MODEL")
    metrics = AgentMetrics(s.tp_group)
    cfg = SupervisorConfig(
        argv=command,
        ledger_dir=s.ledger_dir,
        incidents_dir=s.incidents_dir,
        state_file=s.state_file(),
        policy=ladder.Policy(s.ladder_modes(), s.max_restarts, s.restart_window_s),
        observe=s.observe,
        keep_up_on_give_up=s.on_give_up == "up",
        grace_s=s.stop_grace_s,
        unexplained_stall_s=s.unexplained_stall_s,
        poll_s=s.poll_interval_s,
        upstream=s.upstream,
    )
    gate = proxy = None
    if s.proxy_port:
        gate = UpstreamGate(s.upstream)
        proxy = ResumingProxy(gate, s.proxy_host, s.proxy_port, resume_timeout_s=s.resume_timeout_s)
        try:
            proxy.start()
        except OSError as exc:
            raise WatchdogError(f"proxy_port {s.proxy_port}: {exc.strerror or exc}") from None
        log_event("proxy", f"watchdog run: resuming proxy on {s.proxy_host}:{proxy.port} -> {s.upstream}")
    # The log is this command's voice (one line per state change, --log-format json for pipelines).
    sup = Supervisor(cfg, metrics, _watchers(s, metrics), token=s.token(), gate=gate)
    if proxy is not None:
        sup.proxy_stats = lambda: proxy.stats
    _bounds(sup.agent, s).start()  # the supervisor steps its agent itself (Agent.run does this there)
    handle_signals(sup)
    stop_api = serve_in_background(sup.agent, s.host, s.port)
    try:
        return sup.run()
    finally:
        stop_api()
        if proxy is not None:
            proxy.stop()
        sup.agent.loop.close()


@app.command(cls=GroupedCommand)
@with_settings(CoordinatorSettings)
def coordinator(s: CoordinatorSettings) -> int:
    """Correlate the member agents of one TP group spread over nodes (--agents URL,URL): one diagnosis, one bundle."""
    from watchdog.agent import Agent
    from watchdog.api import serve
    from watchdog.coordinator import Coordinator
    from watchdog.metrics import AgentMetrics

    _logging(s)
    urls = s.agent_urls()
    if not urls:
        raise WatchdogError(
            "agents: give the member agents' base URLs, e.g. --agents http://node-a:9464,http://node-b:9464"
        )
    metrics = AgentMetrics(s.tp_group)
    coord = Coordinator(
        urls,
        s.incidents_dir,
        token=s.token(),
        timeout_s=s.agent_timeout_s,
        on_error=lambda source: metrics.scrape_errors.labels(s.tp_group, source).inc(),
    )
    agent = Agent(coord, metrics, role="coordinator", token=s.token(), poll_s=max(s.poll_interval_s, 0.5))
    agent.on_incident = _kube_actions(s, metrics)
    _bounds(agent, s)
    serve(agent, s.host, s.port)
    return EXIT_OK


@app.command(cls=GroupedCommand)
def discover(
    ledger_dir: Annotated[Path, typer.Option(help="Directory the ranks write their ledgers to.")] = Path(
        "/var/run/watchdog/ledgers"
    ),
    shm_dir: Annotated[Path, typer.Option(help="Where POSIX shared memory lives.")] = Path("/dev/shm"),
    proc_root: Annotated[Path, typer.Option(help="procfs root.")] = Path("/proc"),
    as_json: Annotated[bool, typer.Option("--json", help="Print what was found as JSON.")] = False,
) -> int:
    """What the agent would watch on this node: ledgers and their processes, and vLLM's shm rings."""
    import psutil

    from watchdog.evidence.discover import discover_rings
    from watchdog.snapshot import known_pids, read_ledger_dir

    if not ledger_dir.is_dir():
        raise WatchdogError(f"--ledger-dir {ledger_dir}: not a directory")
    ledgers = read_ledger_dir(ledger_dir)
    known = known_pids(ledgers)
    procs = []
    for pid, label in known.items():
        try:
            p = psutil.Process(pid)
            procs.append({"label": label, "pid": pid, "status": p.status(), "cmdline": " ".join(p.cmdline())[:120]})
        except psutil.Error as exc:
            procs.append({"label": label, "pid": pid, "status": f"not here ({type(exc).__name__})", "cmdline": ""})
    found = discover_rings(str(shm_dir), str(proc_root), known)
    if as_json:
        print(json.dumps({"processes": procs, "missing": list(ledgers.missing), **found.to_json()}))
        return EXIT_OK
    print(f"ledgers in {ledger_dir}:")
    for p in procs:
        print(f"  {p['label']:>6}  pid {p['pid']:<8} {p['status']:<12} {p['cmdline']}")
    for m in ledgers.missing:
        print(f"  missing: {m}")
    print(f"rings in {shm_dir}:")
    for r in found.rings:
        who = ",".join(known.get(pid, str(pid)) for pid in r.owners) or "nobody"
        rank = f" rank {r.rank}" if r.rank is not None else ""
        print(
            f"  {r.name}  {r.role}{rank}  {r.layout.n_readers} reader(s), {r.layout.max_chunks} x "
            f"{r.layout.max_chunk_bytes} B, mapped by {who}"
        )
    print(f"  ({len(found.skipped)} other segment(s) are not rings)")
    return EXIT_OK


@app.command(cls=GroupedCommand)
def openapi() -> int:
    """Print the agent's OpenAPI schema (committed as docs/openapi.json)."""
    print(json.dumps(openapi_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def openapi_schema() -> dict[str, Any]:
    from watchdog.agent import Agent
    from watchdog.api import make_app
    from watchdog.coordinator import Coordinator
    from watchdog.metrics import AgentMetrics

    return make_app(Agent(Coordinator([], Path(".")), AgentMetrics("tp0"))).openapi()


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    interrupted, restore = _watch_sigint()
    try:
        rv = command.main(args=argv if argv is not None else sys.argv[1:], prog_name="watchdog", standalone_mode=False)
    except click_exc.NoArgsIsHelpError:
        return EXIT_USAGE
    except click_exc.UsageError as exc:
        err(f"watchdog: {exc.format_message()}")
        return EXIT_USAGE
    except UsageError as exc:
        err(f"watchdog: {exc}")
        return EXIT_USAGE
    except (typer.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        err("watchdog: interrupted")
        return EXIT_INTERRUPTED
    except (WatchdogError, LedgerError) as exc:
        err(f"watchdog: {exc}")
        return EXIT_ERROR
    except typer.Exit as exc:
        return int(exc.exit_code)
    finally:
        restore()
    if interrupted:  # typer turns Ctrl-C into a plain return of 130: say it, as for any other exit
        from watchdog import logs

        if logs.json_lines():  # a service logging JSON lines: keep stderr all JSON
            logs.event("stopped", "interrupted (SIGINT)", logging.WARNING)
        else:
            err("watchdog: interrupted")
        return EXIT_INTERRUPTED
    return int(rv) if isinstance(rv, int) else EXIT_OK


def _watch_sigint() -> tuple[list[bool], Callable[[], None]]:
    """Note a Ctrl-C (then raise KeyboardInterrupt as usual); returns the flag and an undo."""
    import signal
    import threading

    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(_signum: int, _frame: object) -> None:
        flag.append(True)
        raise KeyboardInterrupt

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    return flag, restore


if __name__ == "__main__":
    sys.exit(main())

"""One settings object for the agent and the coordinator: file < ``WATCHDOG_*`` environment < CLI.

The file is TOML (``--config watchdog.toml``, or ``WATCHDOG_CONFIG``) with the field names below
as top-level keys. Every field is also ``WATCHDOG_<NAME>`` in the environment and ``--<name>``
(dashes for underscores) on the command line. The README's configuration table is generated
from ``FIELDS`` (``tests/test_settings.py`` keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.errors import WatchdogError

ENV_PREFIX = "WATCHDOG_"


@dataclass(frozen=True)
class Settings:
    ledger_dir: Path = Path("/var/run/watchdog/ledgers")
    incidents_dir: Path = Path("/var/lib/watchdog/incidents")
    host: str = "127.0.0.1"
    port: int = 9464
    api_token: str = ""
    api_token_file: Path | None = None
    tp_group: str = "tp0"
    ranks: str = ""
    member: bool = False
    agents: str = ""
    shm_dir: Path = Path("/dev/shm")
    proc_root: Path = Path("/proc")
    poll_interval_s: float = 0.1
    stall_floor_s: float = 1.0
    stall_multiplier: float = 10.0
    cold_deadline_s: float = 60.0
    stack_timeout_s: float = 5.0
    native_stacks: bool = True
    native_timeout_s: float = 2.0
    nvml: bool = True
    nvml_module: str = "pynvml"
    agent_timeout_s: float = 10.0
    ladder: str = "FULL_AND_PIECEWISE,FULL_DECODE_ONLY,NONE"
    max_restarts: int = 3
    restart_window_s: float = 3600.0
    ladder_state_file: Path | None = None
    observe: bool = False
    on_give_up: str = "stop"
    stop_grace_s: float = 30.0
    unexplained_stall_s: float = 30.0
    on_deadlock: str = "report"
    kube_events: bool = False
    kube_api: str = "https://kubernetes.default.svc"
    kube_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kube_ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    pod_name: str = ""
    pod_namespace: str = ""
    proxy_port: int = 0
    proxy_host: str = "127.0.0.1"
    upstream: str = "http://127.0.0.1:8000"
    resume_timeout_s: float = 600.0
    log_format: str = "text"
    log_level: str = "info"
    max_incidents: int = 100
    max_incidents_mb: int = 1024
    diagnose_now_interval_s: float = 10.0

    def owned_ranks(self) -> frozenset[int] | None:
        return parse_ranks(self.ranks)

    def agent_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.agents.split(",") if u.strip()]

    def ladder_modes(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.ladder.split(",") if m.strip())

    def state_file(self) -> Path:
        return self.ladder_state_file or self.incidents_dir / "ladder.json"

    def token(self) -> str:
        if self.api_token_file is not None:
            try:
                return self.api_token_file.read_text().strip()
            except OSError as exc:
                raise WatchdogError(f"api_token_file {self.api_token_file}: {exc.strerror or exc}") from None
        return self.api_token


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
HELP = {
    "ledger_dir": "Directory the ranks (and the engine) write their ledgers to.",
    "incidents_dir": "Where incident bundles are written (keep it on a volume).",
    "host": "Address the HTTP API binds to. Only loopback unless you say otherwise.",
    "port": "HTTP API port (/metrics is served there too).",
    "api_token": "Bearer token for POST endpoints and /v1/snapshot. Empty: POSTs are refused.",
    "api_token_file": "Read the bearer token from this file (a mounted Secret).",
    "tp_group": "Label of this TP group in metrics and incidents.",
    "ranks": "Ranks this agent owns, e.g. '0-3' or '4,5,6,7'. Empty: every ledger in ledger_dir.",
    "member": "Part of a multi-node group: detect and serve evidence, let the coordinator diagnose.",
    "agents": "Coordinator only: comma-separated agent base URLs, e.g. 'http://node-a:9464,http://node-b:9464'.",
    "shm_dir": "Where POSIX shared memory lives (vLLM's rings).",
    "proc_root": "procfs root (the host's /proc when the sidecar shares the process namespace).",
    "poll_interval_s": "How often the ledgers are read.",
    "stall_floor_s": "No stall is declared before a step is this old.",
    "stall_multiplier": "A step stalls at this many times the recent p99 of its kind.",
    "cold_deadline_s": "Deadline while there is no step history (warm-up).",
    "stack_timeout_s": "Bound on py-spy dumps of Python stacks, per process.",
    "native_stacks": "Also take native stacks (py-spy --native).",
    "native_timeout_s": "Bound on native dumps (informational; never delays a diagnosis longer).",
    "nvml_module": "The Python module with pynvml's API (nvidia-ml-py's `pynvml`; a fake in tests).",
    "nvml": "Sample GPUs through NVML (off on machines without NVIDIA GPUs is automatic).",
    "ladder": "watchdog run: cudagraph modes to fall back through, safest last.",
    "max_restarts": "watchdog run: at most this many restarts within restart_window_s, then give up.",
    "restart_window_s": "watchdog run: the window max_restarts counts over.",
    "ladder_state_file": "watchdog run: where the ladder state persists (default: incidents_dir/ladder.json).",
    "observe": "watchdog run: diagnose and report, never restart.",
    "on_give_up": "watchdog run: 'stop' the server or keep it 'up' once the restart bound is hit.",
    "stop_grace_s": "watchdog run: SIGTERM, then SIGKILL after this many seconds.",
    "unexplained_stall_s": "watchdog run: restart at the same rung when a stall no rule explains (inconclusive) "
    "persists this long (vLLM itself waits 300 s).",
    "on_deadlock": "agent/coordinator: 'report', or 'evict' this pod through the Kubernetes API after a deadlock.",
    "kube_events": "agent/coordinator: record a Kubernetes Event on the pod for every incident.",
    "kube_api": "The Kubernetes API server (eviction mode and events).",
    "kube_token_file": "The service-account token for the Kubernetes API.",
    "kube_ca_file": "The CA bundle of the Kubernetes API server.",
    "pod_name": "This pod's name (downward API), for events and eviction.",
    "pod_namespace": "This pod's namespace (downward API), for events and eviction.",
    "proxy_port": "watchdog run: serve the resuming proxy on this port (0: no proxy).",
    "proxy_host": "watchdog run: the proxy's listen address.",
    "upstream": "watchdog run: the server's base URL (its /health says it is ready; the proxy forwards to it).",
    "resume_timeout_s": "watchdog run: how long the proxy holds a request for the restarted server.",
    "agent_timeout_s": "Coordinator only: bound on each pull from an agent.",
    "log_format": "'text' (one human line per state change) or 'json' (one JSON object per line).",
    "log_level": "debug, info, warning or error.",
    "max_incidents": "Keep at most this many incident bundles (oldest deleted first; the newest and unresolved kept).",
    "max_incidents_mb": "Keep the incident bundles under this many MiB in all (same order).",
    "diagnose_now_interval_s": "POST /v1/diagnose-now at most once per this many seconds (429 + Retry-After).",
}

# Which commands read a setting, and the group its option is listed under in their --help.
# (The file and the environment accept every setting everywhere; a command ignores the others.)
AGENT, COORD, RUN = "agent", "coordinator", "run"
_ALL = (AGENT, COORD, RUN)
_LOCAL = (AGENT, RUN)  # the ones that read ledgers and gather evidence on this node
_KUBE = (AGENT, COORD)
SCOPE: dict[str, tuple[str, tuple[str, ...]]] = {
    "ledger_dir": ("Watching", _LOCAL),
    "tp_group": ("Watching", _ALL),
    "poll_interval_s": ("Watching", _ALL),
    "stall_floor_s": ("Stall detection", _LOCAL),
    "stall_multiplier": ("Stall detection", _LOCAL),
    "cold_deadline_s": ("Stall detection", _LOCAL),
    "incidents_dir": ("Incidents", _ALL),
    "max_incidents": ("Incidents", _ALL),
    "max_incidents_mb": ("Incidents", _ALL),
    "host": ("HTTP API", _ALL),
    "port": ("HTTP API", _ALL),
    "api_token": ("HTTP API", _ALL),
    "api_token_file": ("HTTP API", _ALL),
    "diagnose_now_interval_s": ("HTTP API", _ALL),
    "ranks": ("Multi-node", (AGENT,)),
    "member": ("Multi-node", (AGENT,)),
    "agents": ("Multi-node", (COORD,)),
    "agent_timeout_s": ("Multi-node", (COORD,)),
    "shm_dir": ("Evidence", _LOCAL),
    "proc_root": ("Evidence", _LOCAL),
    "stack_timeout_s": ("Evidence", _LOCAL),
    "native_stacks": ("Evidence", _LOCAL),
    "native_timeout_s": ("Evidence", _LOCAL),
    "nvml": ("Evidence", _LOCAL),
    "nvml_module": ("Evidence", _LOCAL),
    "ladder": ("Fallback", (RUN,)),
    "max_restarts": ("Fallback", (RUN,)),
    "restart_window_s": ("Fallback", (RUN,)),
    "ladder_state_file": ("Fallback", (RUN,)),
    "observe": ("Fallback", (RUN,)),
    "on_give_up": ("Fallback", (RUN,)),
    "stop_grace_s": ("Fallback", (RUN,)),
    "unexplained_stall_s": ("Fallback", (RUN,)),
    "proxy_port": ("Resuming proxy", (RUN,)),
    "proxy_host": ("Resuming proxy", (RUN,)),
    "upstream": ("Resuming proxy", (RUN,)),
    "resume_timeout_s": ("Resuming proxy", (RUN,)),
    "on_deadlock": ("Kubernetes", _KUBE),
    "kube_events": ("Kubernetes", _KUBE),
    "kube_api": ("Kubernetes", _KUBE),
    "kube_token_file": ("Kubernetes", _KUBE),
    "kube_ca_file": ("Kubernetes", _KUBE),
    "pod_name": ("Kubernetes", _KUBE),
    "pod_namespace": ("Kubernetes", _KUBE),
    "log_format": ("Logging", _ALL),
    "log_level": ("Logging", _ALL),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def fields_of(command: str) -> list[str]:
    """The settings ``command`` reads, in declaration order."""
    return [name for name in FIELDS if command in SCOPE[name][1]]


def parse_ranks(spec: str) -> frozenset[int] | None:
    """'0-3' / '4,5,6,7' / '0-1,6' -> the set; '' -> None (all)."""
    if not spec.strip():
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise WatchdogError(f"ranks {spec!r}: expected e.g. '0-3' or '0,1,2'") from None
    if not out or min(out) < 0:
        raise WatchdogError(f"ranks {spec!r}: expected e.g. '0-3' or '0,1,2'")
    return frozenset(out)


def _convert(name: str, value: Any, where: str) -> Any:
    kind = str(FIELDS[name].type)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind in ("Path", "Path | None"):
            return None if value in (None, "") and kind == "Path | None" else Path(str(value))
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise WatchdogError(f"{where}: {name} = {value!r} is not a valid {kind.replace(' | None', '')}") from None


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from the defaults, then the file, then the environment, then CLI values that are not None."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise WatchdogError(f"config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise WatchdogError(f"config {path}: not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in FIELDS:
                raise WatchdogError(f"config {path}: unknown setting {key!r}")
            values[key] = _convert(key, value, f"config {path}")
    for name in FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _convert(name, raw, f"environment {ENV_PREFIX}{name.upper()}")
    for name, value in (cli or {}).items():
        if value is not None:
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}")
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise WatchdogError(f"port {s.port}: must be 1-65535")
    for name in (
        "poll_interval_s",
        "stall_floor_s",
        "stall_multiplier",
        "cold_deadline_s",
        "stack_timeout_s",
        "native_timeout_s",
        "agent_timeout_s",
    ):
        if getattr(s, name) <= 0:
            raise WatchdogError(f"{name} = {getattr(s, name)}: must be positive")
    s.owned_ranks()
    if s.on_give_up not in ("stop", "up"):
        raise WatchdogError(f"on_give_up {s.on_give_up!r}: choose 'stop' or 'up'")
    if s.max_restarts < 0 or s.restart_window_s <= 0 or s.stop_grace_s < 0 or s.unexplained_stall_s <= 0:
        raise WatchdogError(
            "max_restarts and stop_grace_s must be >= 0, restart_window_s and unexplained_stall_s positive"
        )
    if s.on_deadlock not in ("report", "evict"):
        raise WatchdogError(f"on_deadlock {s.on_deadlock!r}: choose 'report' or 'evict'")
    if (s.on_deadlock == "evict" or s.kube_events) and not (s.pod_name and s.pod_namespace):
        raise WatchdogError("on_deadlock=evict and kube_events need pod_name and pod_namespace (downward API)")
    if not 0 <= s.proxy_port <= 65535 or s.resume_timeout_s <= 0:
        raise WatchdogError("proxy_port must be within 0-65535 and resume_timeout_s positive")
    if s.log_format not in ("text", "json"):
        raise WatchdogError(f"log_format {s.log_format!r}: choose 'text' or 'json'")
    if s.log_level.lower() not in LOG_LEVELS:
        raise WatchdogError(f"log_level {s.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    if s.max_incidents < 1 or s.max_incidents_mb < 1 or s.diagnose_now_interval_s < 0:
        raise WatchdogError("max_incidents and max_incidents_mb must be >= 1, diagnose_now_interval_s >= 0")
    if not s.upstream.startswith(("http://", "https://")):
        raise WatchdogError(f"upstream {s.upstream!r}: give the server's base URL, e.g. http://127.0.0.1:8000")


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| Setting | Environment | Default | Commands | Meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not None else ""
        flag, used = f"--{f.name.replace('_', '-')}", ", ".join(SCOPE[f.name][1])
        rows.append(f"| `{flag}` | `{env_name(f.name)}` | `{default}` | {used} | {HELP[f.name]} |")
    return "\n".join(rows)

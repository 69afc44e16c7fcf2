"""Typed settings, one model per command: defaults < TOML file < ``WATCHDOG_*`` environment < CLI.

The file is TOML (``--config watchdog.toml``, or ``WATCHDOG_CONFIG``) with the field names below
as top-level keys. Every field is also ``WATCHDOG_<NAME>`` in the environment and ``--<name>``
(dashes for underscores) on the command line.

Each part below is one group of settings (the heading its options are listed under in ``--help``);
a command's model is the parts it reads (``AgentSettings``, ``RunSettings``,
``CoordinatorSettings``), and ``Settings`` holds every part. One file can serve all three
commands: the file and the environment accept every setting, and a command ignores the ones it
does not read. The README's configuration table is generated from the fields' descriptions
(``tests/test_settings.py`` keeps the two in step).

Why one module: just over 400 lines, and the parts are the one table of every setting a user
reads; the loader below them (file, environment, one-line errors, the README table) is that
table's only reader.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, SettingsConfigDict

from watchdog.errors import ConfigError

ENV_PREFIX = "WATCHDOG_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Positive = Annotated[float, Field(gt=0)]
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]  # "" in the environment: not set
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)]


def _rank_set(spec: str) -> frozenset[int] | None:
    if not spec.strip():
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        out = set()
    if not out or min(out) < 0:
        raise ValueError("expected e.g. '0-3' or '0,1,2'")
    return frozenset(out)


def parse_ranks(spec: str) -> frozenset[int] | None:
    """'0-3' / '4,5,6,7' / '0-1,6' -> the set; '' -> None (all)."""
    try:
        return _rank_set(spec)
    except ValueError as exc:
        raise ConfigError(f"ranks {spec!r}: {exc}") from None


class _Part(BaseModel):
    group: ClassVar[str]


class Watching(_Part):
    group = "Watching"
    tp_group: str = Field("tp0", description="Label of this TP group in metrics and incidents.")
    poll_interval_s: Positive = Field(0.1, description="How often the ledgers are read.")


class Ledgers(_Part):
    group = "Watching"
    ledger_dir: Path = Field(
        Path("/var/run/watchdog/ledgers"), description="Directory the ranks (and the engine) write their ledgers to."
    )


class StallDetection(_Part):
    group = "Stall detection"
    stall_floor_s: Positive = Field(1.0, description="No stall is declared before a step is this old.")
    stall_max_floor_s: Positive = Field(
        5.0,
        description="A stall that was over after all (a slow step, not a hang) raises the floor to 1.5 x its "
        "length, up to this.",
    )
    stall_multiplier: Positive = Field(10.0, description="A step stalls at this many times the recent p99 of its kind.")
    cold_deadline_s: Positive = Field(60.0, description="Deadline while there is no step history (warm-up).")


class Incidents(_Part):
    group = "Incidents"
    incidents_dir: Path = Field(
        Path("/var/lib/watchdog/incidents"), description="Where incident bundles are written (keep it on a volume)."
    )
    max_incidents: int = Field(
        100,
        ge=1,
        description="Keep at most this many incident bundles (oldest deleted first; the newest and unresolved kept).",
    )
    max_incidents_mb: int = Field(
        1024, ge=1, description="Keep the incident bundles under this many MiB in all (same order)."
    )


class HttpApi(_Part):
    group = "HTTP API"
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to. Only loopback unless you say otherwise.")
    port: int = Field(9464, ge=1, le=65535, description="HTTP API port (/metrics is served there too).")
    api_token: str = Field(
        "", description="Bearer token for POST endpoints and /v1/snapshot. Empty: POSTs are refused."
    )
    api_token_file: OptionalPath = Field(None, description="Read the bearer token from this file (a mounted Secret).")
    diagnose_now_interval_s: float = Field(
        10.0, ge=0, description="POST /v1/diagnose-now at most once per this many seconds (429 + Retry-After)."
    )

    def token(self) -> str:
        if self.api_token_file is not None:
            try:
                return self.api_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"api_token_file {self.api_token_file}: {exc.strerror or exc}") from None
        return self.api_token


class Member(_Part):
    group = "Multi-node"
    ranks: str = Field(
        "", description="Ranks this agent owns, e.g. '0-3' or '4,5,6,7'. Empty: every ledger in ledger_dir."
    )
    member: bool = Field(
        False, description="Part of a multi-node group: detect and serve evidence, let the coordinator diagnose."
    )

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, spec: str) -> str:
        _rank_set(spec)
        return spec

    def owned_ranks(self) -> frozenset[int] | None:
        return parse_ranks(self.ranks)


class Members(_Part):
    group = "Multi-node"
    agents: str = Field(
        "",
        description="Coordinator only: comma-separated agent base URLs, e.g. 'http://node-a:9464,http://node-b:9464'.",
    )
    agent_timeout_s: Positive = Field(10.0, description="Coordinator only: bound on each pull from an agent.")

    def agent_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.agents.split(",") if u.strip()]


class Evidence(_Part):
    group = "Evidence"
    shm_dir: Path = Field(Path("/dev/shm"), description="Where POSIX shared memory lives (vLLM's rings).")
    proc_root: Path = Field(
        Path("/proc"), description="procfs root (the host's /proc when the sidecar shares the process namespace)."
    )
    stack_timeout_s: Positive = Field(5.0, description="Bound on py-spy dumps of Python stacks, per process.")
    native_stacks: bool = Field(True, description="Also take native stacks (py-spy --native).")
    native_timeout_s: Positive = Field(
        2.0, description="Bound on native dumps (informational; never delays a diagnosis longer)."
    )
    nvml: bool = Field(True, description="Sample GPUs through NVML (off on machines without NVIDIA GPUs is automatic).")
    nvml_module: str = Field(
        "pynvml", description="The Python module with pynvml's API (nvidia-ml-py's `pynvml`; a fake in tests)."
    )


class Fallback(_Part):
    group = "Fallback"
    ladder: str = Field(
        "FULL_AND_PIECEWISE,FULL_DECODE_ONLY,NONE",
        description="watchdog run: cudagraph modes to fall back through, safest last.",
    )
    max_restarts: int = Field(
        3, ge=0, description="watchdog run: at most this many restarts within restart_window_s, then give up."
    )
    restart_window_s: Positive = Field(3600.0, description="watchdog run: the window max_restarts counts over.")
    ladder_state_file: OptionalPath = Field(
        None, description="watchdog run: where the ladder state persists (default: incidents_dir/ladder.json)."
    )
    observe: bool = Field(False, description="watchdog run: diagnose and report, never restart.")
    on_give_up: Literal["stop", "up"] = Field(
        "stop", description="watchdog run: 'stop' the server or keep it 'up' once the restart bound is hit."
    )
    stop_grace_s: float = Field(30.0, ge=0, description="watchdog run: SIGTERM, then SIGKILL after this many seconds.")
    unexplained_stall_s: Positive = Field(
        30.0,
        description="watchdog run: restart at the same rung when a stall no rule explains (inconclusive) "
        "persists this long (vLLM itself waits 300 s).",
    )

    def ladder_modes(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.ladder.split(",") if m.strip())


class ResumingProxy(_Part):
    group = "Resuming proxy"
    proxy_port: int = Field(
        0, ge=0, le=65535, description="watchdog run: serve the resuming proxy on this port (0: no proxy)."
    )
    proxy_host: str = Field("127.0.0.1", description="watchdog run: the proxy's listen address.")
    upstream: str = Field(
        "http://127.0.0.1:8000",
        description="watchdog run: the server's base URL (its /health says it is ready; the proxy forwards to it).",
    )
    resume_timeout_s: Positive = Field(
        600.0, description="watchdog run: how long the proxy holds a request for the restarted server."
    )

    @field_validator("upstream")
    @classmethod
    def _base_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("give the server's base URL, e.g. http://127.0.0.1:8000")
        return url


class Kubernetes(_Part):
    group = "Kubernetes"
    on_deadlock: Literal["report", "evict"] = Field(
        "report",
        description="agent/coordinator: 'report', or 'evict' this pod through the Kubernetes API after a deadlock.",
    )
    kube_events: bool = Field(
        False, description="agent/coordinator: record a Kubernetes Event on the pod for every incident."
    )
    kube_api: str = Field(
        "https://kubernetes.default.svc", description="The Kubernetes API server (eviction mode and events)."
    )
    kube_token_file: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="The service-account token for the Kubernetes API.",
    )
    kube_ca_file: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        description="The CA bundle of the Kubernetes API server.",
    )
    pod_name: str = Field("", description="This pod's name (downward API), for events and eviction.")
    pod_namespace: str = Field("", description="This pod's namespace (downward API), for events and eviction.")

    @model_validator(mode="after")
    def _pod_known(self) -> Kubernetes:
        if (self.on_deadlock == "evict" or self.kube_events) and not (self.pod_name and self.pod_namespace):
            raise ValueError("on_deadlock=evict and kube_events need pod_name and pod_namespace (downward API)")
        return self


class Logging(_Part):
    group = "Logging"
    log_format: Literal["text", "json"] = Field(
        "text", description="'text' (one human line per state change) or 'json' (one JSON object per line)."
    )
    log_level: LogLevel = Field("info", description="debug, info, warning or error.")


# The order the parts are listed in (--help, the README table).
PARTS: tuple[type[_Part], ...] = (
    Ledgers, Watching, StallDetection, Incidents, HttpApi, Member, Members, Evidence, Fallback, ResumingProxy,
    Kubernetes, Logging,
)  # fmt: skip


class CommandSettings(BaseSettings):
    # Frozen: settings are read once at start; extra keys are a programming error (the file's
    # unknown keys are reported before a model sees them).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")


class AgentSettings(
    CommandSettings, Ledgers, Watching, StallDetection, Incidents, HttpApi, Member, Evidence, Kubernetes, Logging
):
    """``watchdog agent``: the sidecar watching this node's ranks."""


class RunSettings(
    CommandSettings, Ledgers, Watching, StallDetection, Incidents, HttpApi, Evidence, Fallback, ResumingProxy, Logging
):
    """``watchdog run``: the supervisor of one server."""

    def state_file(self) -> Path:
        return self.ladder_state_file or self.incidents_dir / "ladder.json"


class CoordinatorSettings(CommandSettings, Watching, Incidents, HttpApi, Members, Kubernetes, Logging):
    """``watchdog coordinator``: correlates the member agents of one TP group."""


class Settings(
    CommandSettings, Ledgers, Watching, StallDetection, Incidents, HttpApi, Member, Members, Evidence, Fallback,
    ResumingProxy, Kubernetes, Logging,
):  # fmt: skip
    """Every setting (what the file and the environment may hold)."""

    def state_file(self) -> Path:
        return self.ladder_state_file or self.incidents_dir / "ladder.json"


COMMANDS: dict[str, type[CommandSettings]] = {
    "agent": AgentSettings,
    "coordinator": CoordinatorSettings,
    "run": RunSettings,
}
FIELDS: dict[str, FieldInfo] = {name: Settings.model_fields[name] for part in PARTS for name in part.model_fields}
GROUP: dict[str, str] = {name: part.group for part in PARTS for name in part.model_fields}

S = TypeVar("S", bound=CommandSettings)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def fields_of(command: str) -> list[str]:
    """The settings ``command`` reads, in the parts' order."""
    return [name for name in FIELDS if name in COMMANDS[command].model_fields]


def commands_of(name: str) -> list[str]:
    return [command for command, model in COMMANDS.items() if name in model.model_fields]


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass one) instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}  # the models' names are case-insensitive


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"config {path}: unknown setting {key!r}")
    return data


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
    model: type[S] = Settings,  # type: ignore[assignment]  # the default model is one S
) -> S:
    """``model`` from the defaults, then the file, then the environment, then CLI values that are not None."""
    env = os.environ if env is None else env
    path = config_file or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    file = {k: v for k, v in _read_file(path).items() if k in model.model_fields} if path is not None else {}
    given = {k: v for k, v in (cli or {}).items() if v is not None}
    sources = (InitSettingsSource(model, given), _Environment(model, env), InitSettingsSource(model, file))
    try:
        return model(_build_sources=(sources, {}))  # type: ignore[call-arg]  # BaseSettings.__init__'s own
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, path, env, given)) from None


def _one_line(exc: ValidationError, path: Path | None, env: Mapping[str, str], given: Mapping[str, Any]) -> str:
    """The first error as one line naming where the value came from and what is wrong with it."""
    err = exc.errors()[0]
    ctx = err.get("ctx", {})
    if not err["loc"]:  # a check across settings
        return str(ctx.get("error", err["msg"]))
    name = str(err["loc"][0])
    if name in given:
        where = f"--{name.replace('_', '-')}"
    elif any(k.upper() == env_name(name) for k in env):
        where = f"environment {env_name(name)}"
    else:
        where = f"config {path}"
    value, kind = err.get("input"), err["type"]
    if kind == "literal_error":
        problem = f"choose {ctx['expected']}"
    elif kind == "greater_than":
        problem = "must be positive" if ctx["gt"] == 0 else f"must be > {ctx['gt']}"
    elif kind in ("greater_than_equal", "less_than_equal"):
        field = FIELDS[name]
        low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
        high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
        problem = f"must be {low}-{high}" if low is not None and high is not None else f"must be >= {low}"
    elif kind == "value_error":
        problem = str(ctx["error"])
    else:
        annotation = FIELDS[name].annotation
        problem = f"is not a valid {getattr(annotation, '__name__', 'value')}"
        return f"{where}: {name} = {value!r} {problem}"
    return f"{where}: {name} = {value!r}: {problem}"


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| Setting | Environment | Default | Commands | Meaning |", "|---|---|---|---|---|"]
    for name, field in FIELDS.items():
        default = "" if field.default is None else field.default
        flag, used = f"--{name.replace('_', '-')}", ", ".join(commands_of(name))
        rows.append(f"| `{flag}` | `{env_name(name)}` | `{default}` | {used} | {field.description} |")
    return "\n".join(rows)

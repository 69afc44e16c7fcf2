"""The agent's optional Kubernetes actions: an Event per incident, and evicting its own pod on a deadlock.

Two calls and one read, with the pod's service-account token, nothing else (the Role in
``deploy/components/eviction`` grants exactly these): ``GET pods/<pod>`` (the uid the Event refers
to), ``POST events``, ``POST pods/<pod>/eviction`` (an Eviction, so PodDisruptionBudgets are
respected; the controller recreates the pod on fresh GPUs, where a liveness restart only restarts
the container). Failures are logged and counted, never raised into the watch loop.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from watchdog.errors import WatchdogError
from watchdog.incident import Incident

log = logging.getLogger("watchdog")

COMPONENT = "tp-deadlock-watchdog"


class KubeError(Exception):
    pass


@dataclass
class Kube:
    api: str  # e.g. https://kubernetes.default.svc
    token_file: Path
    ca_file: Path | None
    namespace: str
    pod: str
    timeout_s: float = 5.0
    transport: httpx.BaseTransport | None = field(default=None, repr=False)
    """What requests go through (default HTTP(S) over TCP, verified with ``ca_file``); tests give a mock."""

    def __post_init__(self) -> None:
        if not self.pod or not self.namespace:
            raise WatchdogError("pod_name and pod_namespace are needed for Kubernetes actions (downward API)")
        if urlsplit(self.api).scheme not in ("http", "https"):
            raise WatchdogError(f"kube_api {self.api!r}: give the API server's URL")
        self._uid: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KubeError(f"service-account token {self.token_file}: {exc.strerror}") from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        verify: ssl.SSLContext | bool = True
        try:
            if self.transport is None and urlsplit(self.api).scheme == "https":
                verify = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            with httpx.Client(transport=self.transport, verify=verify, timeout=self.timeout_s, trust_env=False) as c:
                resp = c.request(method, self.api.rstrip("/") + path, json=body, headers=headers)
        except (httpx.HTTPError, OSError) as exc:  # OSError: an unreadable CA file
            raise KubeError(f"{method} {path}: {exc}") from None
        raw = resp.content
        if resp.status_code >= 300:
            raise KubeError(f"{method} {path}: HTTP {resp.status_code} {raw[:200].decode(errors='replace')}")
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        return answer if isinstance(answer, dict) else {}

    def _pod_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod}"

    def pod_uid(self) -> str:
        if self._uid is None:
            self._uid = str(self._request("GET", self._pod_path()).get("metadata", {}).get("uid", ""))
        return self._uid

    def event(self, reason: str, message: str, kind: str = "Warning") -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.pod}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.pod,
                "namespace": self.namespace,
                "uid": self.pod_uid(),
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._request("POST", f"/api/v1/namespaces/{self.namespace}/events", body)

    def evict(self) -> None:
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": self.pod, "namespace": self.namespace},
        }
        self._request("POST", self._pod_path() + "/eviction", body)


def incident_actions(
    kube: Kube, events: bool, evict: bool, on_error: Callable[[], None] = lambda: None
) -> Callable[[Incident], None]:
    """What the agent does after writing an incident bundle: an Event, then (a deadlock) the eviction."""

    def act(incident: Incident) -> None:
        d = incident.diagnosis
        if events:
            try:
                kube.event(
                    "DeadlockDiagnosed" if d.verdict.is_deadlock else "StallInconclusive",
                    f"{d.verdict.value}: {d.summary} (bundle {incident.bundle.name})",
                )
            except KubeError as exc:
                log.warning("kubernetes event not recorded: %s", exc)
                on_error()
        if evict and d.verdict.is_deadlock:
            try:
                kube.evict()
                log.warning("evicted pod %s/%s after %s", kube.namespace, kube.pod, d.verdict.value)
            except KubeError as exc:
                log.warning("eviction of %s/%s failed: %s", kube.namespace, kube.pod, exc)
                on_error()

    return act

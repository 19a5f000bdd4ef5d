"""The deployment manifests hold what the daemon needs: deploy/kubernetes (every kustomization) and deploy/cloudrun.

Each manifest is read as the daemon would read it: the image's variables (deploy/container/Containerfile),
then the container's own env over them, over the TOML that CONSUMERD_CONFIG names (the ConfigMap when it
is mounted there), over the defaults, all through `consumerd.config.load_settings`. The kinds without an
offline schema (KEDA, Managed Prometheus, Cloud Run, CREMA) are held here by the fields that matter;
`deploy/kubernetes/validate.py` (run by `make lint`) checks the others against Kubernetes' schemas.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import tomllib
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from consumerd import __version__
from consumerd.adapters.prometheus import Metrics, MetricsServer
from consumerd.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
CLOUDRUN = ROOT / "deploy" / "cloudrun"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
IMAGE_TOML = ROOT / "deploy" / "container" / "consumerd.toml"
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(ROOT)) for p in KUBERNETES.rglob("kustomization.yaml"))
CLOUD_RUN_STOP_GRACE = 10  # Cloud Run: SIGTERM, then SIGKILL 10 s later; not configurable
BACKLOG_METRIC = "pubsub.googleapis.com|subscription|num_undelivered_messages"
GMP_QUERY_API = "https://monitoring.googleapis.com/v1/projects/{project}/location/global/prometheus"


def _load_validate() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_kubernetes_validate", KUBERNETES / "validate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validate()
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomizations")


# == reading the manifests =========================================================================
def rendered(kustomization: str) -> list[dict[str, Any]]:
    return validate.render(ROOT / kustomization)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def worker_pool() -> dict[str, Any]:
    return yaml.safe_load((CLOUDRUN / "worker-pool.yaml").read_text())


def crema() -> dict[str, Any]:
    return yaml.safe_load((CLOUDRUN / "crema.yaml").read_text())


def image_instructions() -> tuple[dict[str, str], str]:
    """The final stage's ENV variables and USER of deploy/container/Containerfile ({} and '' without one)."""
    if not CONTAINERFILE.exists():
        return {}, ""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    final = re.split(r"^FROM\s", text, flags=re.M)[-1]
    env: dict[str, str] = {}
    user = ""
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest) if "=" in token)
        elif word == "USER":
            user = rest.strip()
    return env, user


def container_env(spec: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in spec.get("env", []) if "value" in item}


def config_file(workload: dict[str, Any], docs: list[dict[str, Any]], env: dict[str, str], tmp_path: Path) -> Path | None:
    """The TOML the daemon reads: the ConfigMap key mounted where CONSUMERD_CONFIG points, else the image's file."""
    path = PurePosixPath(env.get("CONSUMERD_CONFIG", "/etc/consumerd.toml"))
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container(workload).get("volumeMounts", []):
        if path.parent == PurePosixPath(mount["mountPath"]) and "configMap" in volumes[mount["name"]]:
            maps = {d["metadata"]["name"]: d for d in kinds(docs, "ConfigMap")}
            data = maps[volumes[mount["name"]]["configMap"]["name"]]["data"]
            assert path.name in data, f"the ConfigMap mounted at {mount['mountPath']} has no {path.name}"
            out = tmp_path / path.name
            out.write_text(data[path.name])
            return out
    if path == PurePosixPath("/etc/consumerd/consumerd.toml") and IMAGE_TOML.exists():
        return IMAGE_TOML
    return None


def effective(workload: dict[str, Any], docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The settings the daemon in this workload runs with, as `consumerd run` loads them."""
    image_env, _ = image_instructions()
    env = {**image_env, **container_env(container(workload))}
    read = ("PUBSUB_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")  # besides CONSUMERD_*, what the settings read
    for name in [n for n in os.environ if n.startswith("CONSUMERD_") or n in read]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CONSUMERD_") or name in read:
            monkeypatch.setenv(name, value)
    return load_settings(config_file(workload, docs, env, tmp_path))


def shipped_workloads() -> list[tuple[str, str]]:
    """(where, kind) of every workload shipped: each kustomization's Deployment and the Cloud Run worker pool."""
    return [(k, "Deployment") for k in KUSTOMIZATIONS] + [("deploy/cloudrun/worker-pool.yaml", "WorkerPool")]


def load_workload(where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if where.endswith(".yaml"):
        doc = worker_pool()
        return doc, [doc]
    docs = rendered(where)
    return one(docs, "Deployment"), docs


def subscription_id(settings: Settings) -> str:
    return settings.pubsub.subscription_path.rsplit("/", 1)[1]


# == the grace inequality ==========================================================================
def stop_grace(workload: dict[str, Any]) -> float:
    if workload["kind"] == "WorkerPool":
        return CLOUD_RUN_STOP_GRACE
    return float(workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))


@needs_kubectl
@pytest.mark.parametrize("where", [where for where, _kind in shipped_workloads()])
def test_the_stop_grace_covers_the_drain_the_kill_grace_and_the_ack_flush(where, monkeypatch, tmp_path):
    """The settings the workload runs with (image, env, ConfigMap), held against its SIGKILL."""
    workload, docs = load_workload(where)
    shutdown = effective(workload, docs, monkeypatch, tmp_path).shutdown
    needed = shutdown.drain_timeout + shutdown.kill_grace + shutdown.flush_timeout
    assert stop_grace(workload) >= needed, (where, stop_grace(workload), shutdown)


def test_cloud_run_sets_all_three_stop_figures_within_its_fixed_10_s(monkeypatch, tmp_path):
    workload = worker_pool()
    env = container_env(container(workload))
    for name in ("CONSUMERD_SHUTDOWN__DRAIN_TIMEOUT", "CONSUMERD_SHUTDOWN__KILL_GRACE", "CONSUMERD_SHUTDOWN__FLUSH_TIMEOUT"):
        assert name in env, name
    shutdown = effective(workload, [workload], monkeypatch, tmp_path).shutdown
    assert 0 < shutdown.drain_timeout and shutdown.drain_timeout + shutdown.kill_grace + shutdown.flush_timeout <= CLOUD_RUN_STOP_GRACE


# == the Deployment: probes, security, config ======================================================
@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates(kustomization, capsys):
    assert validate.main([str(ROOT / kustomization)]) == 0, capsys.readouterr().out


@needs_kubectl
def test_the_validation_fails_on_a_broken_field(tmp_path, capsys):
    broken = tmp_path / "base"
    shutil.copytree(KUBERNETES / "base", broken)
    text = (broken / "deployment.yaml").read_text()
    (broken / "deployment.yaml").write_text(text.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
    assert validate.main([str(broken)]) == 1
    assert "readOnlyRootFileSystem" in capsys.readouterr().out


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_probes_ask_the_daemons_own_endpoints_on_its_metrics_port(kustomization, monkeypatch, tmp_path):
    docs = rendered(kustomization)
    deployment = one(docs, "Deployment")
    spec = container(deployment)
    listen = effective(deployment, docs, monkeypatch, tmp_path).metrics.listen
    host, _, port = listen.rpartition(":")
    assert host not in ("127.0.0.1", "localhost", "[::1]"), "kubelet probes the pod's IP: loopback would fail every probe"
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"metrics": int(port)}
    probes = {name: spec[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {
        "startupProbe": {"path": "/healthz", "port": int(port)},
        "livenessProbe": {"path": "/healthz", "port": int(port)},
        "readinessProbe": {"path": "/readyz", "port": int(port)},
    }


def test_the_daemon_serves_the_probed_paths():
    metrics = Metrics("test", lambda: ({}, {}), ())
    server = MetricsServer(metrics, "127.0.0.1:0")
    server.start()
    try:
        answers = {}
        for path in ("/healthz", "/readyz", "/nope"):
            try:
                answers[path] = urllib.request.urlopen(f"http://{server.address}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                answers[path] = exc.code
    finally:
        server.stop()
    assert answers == {"/healthz": 200, "/readyz": 503, "/nope": 404}  # live while starting, not yet ready


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_pod_runs_unprivileged_on_a_read_only_root_as_the_images_user(kustomization):
    deployment = one(rendered(kustomization), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    context = container(deployment)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    for level in (pod["securityContext"], context):
        assert level["runAsNonRoot"] is True and level["runAsUser"] == 10001 and level["seccompProfile"] == {"type": "RuntimeDefault"}
    _, user = image_instructions()
    if user:
        assert user.split(":")[0] == str(context["runAsUser"]), "the Containerfile's USER and the manifests' runAsUser differ"
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]]
    resources = container(deployment)["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_config_map_is_the_config_file_and_loads(kustomization, monkeypatch, tmp_path):
    docs = rendered(kustomization)
    deployment = one(docs, "Deployment")
    env = {**image_instructions()[0], **container_env(container(deployment))}
    path = config_file(deployment, docs, env, tmp_path)
    assert path is not None and path.parent == tmp_path, "CONSUMERD_CONFIG does not name a file of the mounted ConfigMap"
    settings = effective(deployment, docs, monkeypatch, tmp_path)
    settings.require_subscription(str(path))
    assert settings.tasks.modules and settings.workers.concurrency >= 1
    account = one(docs, "ServiceAccount")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_no_key_of_the_toml_is_hidden_by_a_variable():
    """A variable wins over the file: a key set in the ConfigMap's TOML and by the image or the
    Deployment as CONSUMERD_* would silently not apply."""
    data = tomllib.loads((KUBERNETES / "base" / "consumerd.toml").read_text())
    in_file = {f"CONSUMERD_{section}__{key}".upper() for section, keys in data.items() for key in keys}
    deployment = yaml.safe_load((KUBERNETES / "base" / "deployment.yaml").read_text())
    variables = set(image_instructions()[0]) | set(container_env(container(deployment)))
    assert in_file and in_file & variables == set()


# == images, autoscalers, monitoring ===============================================================
@needs_kubectl
def test_every_manifest_runs_the_same_image_at_this_version():
    images = {container(one(rendered(k), "Deployment"))["image"] for k in KUSTOMIZATIONS}
    images.add(container(worker_pool())["image"])
    assert len(images) == 1, images
    assert images.pop().rsplit(":", 1)[1] == __version__  # `make image` builds localhost/consumerd:VERSION


@needs_kubectl
def test_the_hpa_scales_the_deployment_on_the_subscriptions_backlog_and_on_cpu(monkeypatch, tmp_path):
    docs = rendered("deploy/kubernetes/hpa")
    deployment, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"], "the HPA owns the count: an applied replicas would reset it"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    external = metrics["External"]["external"]
    assert external["metric"]["name"] == BACKLOG_METRIC
    settings = effective(deployment, docs, monkeypatch, tmp_path)
    assert external["metric"]["selector"]["matchLabels"] == {"resource.labels.subscription_id": subscription_id(settings)}
    assert external["target"]["type"] == "AverageValue"
    assert metrics["Resource"]["resource"]["name"] == "cpu"


def exported_metric_names() -> set[str]:
    metrics = Metrics("test", lambda: ({"pull": 1}, {("pull", "UNAVAILABLE"): 1}), ())
    text = metrics.exposition().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))


@needs_kubectl
def test_keda_scales_on_metrics_consumerd_exports_as_managed_prometheus_stores_them(monkeypatch, tmp_path):
    docs = rendered("deploy/kubernetes/keda")
    deployment, scaled = one(docs, "Deployment"), one(docs, "ScaledObject")
    monitoring = one(docs, "PodMonitoring")
    settings = effective(deployment, docs, monkeypatch, tmp_path)
    project = settings.pubsub.project
    assert "replicas" not in deployment["spec"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1
    auths = {d["metadata"]["name"]: d["spec"] for d in kinds(docs, "TriggerAuthentication")}
    triggers = {t["name"] if "name" in t else t["type"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"demand", "backlog", "cpu"}
    for name in ("demand", "backlog"):
        trigger = triggers[name]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"] == GMP_QUERY_API.format(project=project)
        assert auths[trigger["authenticationRef"]["name"]] == {"podIdentity": {"provider": "gcp"}}
        float(trigger["metadata"]["threshold"])
    demand = triggers["demand"]["metadata"]["query"]
    used = set(re.findall(r"\bconsumerd_[a-z_]+", demand))
    assert used == {"consumerd_tasks_running", "consumerd_messages_held", "consumerd_concurrency"}
    assert used <= exported_metric_names()
    assert set(re.findall(r'job="([^"]+)"', demand)) == {monitoring["metadata"]["name"]}  # GMP's job label
    backlog = triggers["backlog"]["metadata"]["query"]
    assert "pubsub.googleapis.com/subscription/num_undelivered_messages" in backlog
    assert f'"subscription_id"="{subscription_id(settings)}"' in backlog


@needs_kubectl
@pytest.mark.parametrize("kustomization", ["deploy/kubernetes/managed-prometheus", "deploy/kubernetes/keda"])
def test_managed_prometheus_scrapes_the_pods_metrics_port(kustomization):
    docs = rendered(kustomization)
    deployment, monitoring = one(docs, "Deployment"), one(docs, "PodMonitoring")
    assert monitoring["apiVersion"] == "monitoring.googleapis.com/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitoring["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitoring["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in container(deployment)["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"]


def test_the_worker_pool_has_no_port_and_a_drain_set_for_cloud_runs_grace(monkeypatch, tmp_path):
    pool = worker_pool()
    assert (pool["apiVersion"], pool["kind"]) == ("run.googleapis.com/v1", "WorkerPool")
    spec = container(pool)
    assert "ports" not in spec and "livenessProbe" not in spec
    settings = effective(pool, [pool], monkeypatch, tmp_path)
    settings.require_subscription("worker-pool.yaml")
    host = settings.metrics.listen.rpartition(":")[0]
    assert host in ("127.0.0.1", ""), "nothing connects to a worker pool instance"
    annotations = pool["metadata"]["annotations"]
    assert annotations["run.googleapis.com/scalingMode"] == "manual" and int(annotations["run.googleapis.com/manualInstanceCount"]) >= 1
    assert pool["spec"]["template"]["spec"]["serviceAccountName"].endswith(".iam.gserviceaccount.com")


def test_crema_scales_the_worker_pool_on_its_subscriptions_backlog(monkeypatch, tmp_path):
    config, pool = crema(), worker_pool()
    assert (config["apiVersion"], config["kind"]) == ("crema/v1", "CremaConfig")
    settings = effective(pool, [pool], monkeypatch, tmp_path)
    auths = {a["metadata"]["name"]: a["spec"] for a in config["spec"]["triggerAuthentications"]}
    (scaled,) = config["spec"]["scaledObjects"]
    target = scaled["spec"]["scaleTargetRef"]["name"]
    assert re.fullmatch(rf"projects/{settings.pubsub.project}/locations/[^/]+/workerpools/{pool['metadata']['name']}", target)
    assert scaled["spec"]["minReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"  # CREMA's verified scalers; its cpu scaler is Kubernetes-only
    assert trigger["metadata"]["serverAddress"] == GMP_QUERY_API.format(project=settings.pubsub.project)
    assert f'"subscription_id"="{subscription_id(settings)}"' in trigger["metadata"]["query"]
    assert auths[trigger["authenticationRef"]["name"]] == {"podIdentity": {"provider": "gcp"}}

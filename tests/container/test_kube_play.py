"""The Kubernetes manifests under `podman kube play`, against the host's Pub/Sub emulator.

deploy/kubernetes as `kubectl kustomize` renders it, with a test overlay generated here: one replica
on the host's network (loopback only, so `ports:` go), the local image (imagePullPolicy: Never), the
emulator's subscription, the test tasks mounted on the image's /opt/tasks, an exec liveness probe
(podman runs an httpGet probe as curl inside the container, which the image has not), and a drain
short enough for a test. Everything else is the shipped Deployment: its ConfigMap mounted as the
config file, the non-root read-only security context, the emptyDir /tmp, the resource limits.

podman honours hostNetwork, env, ConfigMap volumes, runAsUser, readOnlyRootFilesystem, limits and
the liveness probe (as a healthcheck run by `podman healthcheck run`); it ignores the readiness probe
and terminationGracePeriodSeconds, so the stop is `podman pod stop -t GRACE`, as kubelet would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumerd.config import ShutdownSettings
from consumerd.testing.emulator import free_port
from tests.container.runtime import owned_dir, podman
from tests.support.pubsub import Ledger

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
DRAIN = 4.0  # seconds: the 45 s of the shipped Deployment would make a slow test
GRACE = math.ceil(DRAIN + ShutdownSettings().kill_grace + ShutdownSettings().flush_timeout)  # what the manifests' test holds
LONG_TASK = 8.0  # longer than DRAIN: ended at the drain timeout, given back, run again
SHORT_TASK = 1.5
SHORTS = 6


def overlay(tmp_path: Path, image: str, subscription: str, emulator_host: str, port: int, ledger: Path) -> Path:
    """A kustomization over deploy/kubernetes with what podman and this test need, in tmp_path/overlay."""
    out = tmp_path / "overlay"
    out.mkdir()
    # podman runs an exec probe as CMD-SHELL: its words joined with spaces, then parsed by /bin/sh.
    # One word holding the whole shell command is what survives that (and only that: kubelet would
    # exec it as one file name; the shipped manifests use httpGet, which podman runs as curl).
    code = f"__import__('urllib.request').request.urlopen('http://127.0.0.1:{port}/healthz',timeout=3)"
    probe = f'/opt/consumerd/bin/python -c "{code}"'
    env = {
        "CONSUMERD_PUBSUB__SUBSCRIPTION": subscription,
        "CONSUMERD_PUBSUB__EMULATOR_HOST": emulator_host,
        "CONSUMERD_TASKS__MODULES": json.dumps(["tests.support.tasks"]),
        "CONSUMERD_METRICS__LISTEN": f"127.0.0.1:{port}",  # host network: loopback, never 0.0.0.0
        "CONSUMERD_SHUTDOWN__DRAIN_TIMEOUT": str(DRAIN),
        "TEST_LEDGER_DIR": "/ledger",
    }
    json_patch = [
        {"op": "replace", "path": "/spec/replicas", "value": 1},
        {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
        {"op": "replace", "path": "/spec/template/spec/terminationGracePeriodSeconds", "value": GRACE},
        {"op": "remove", "path": "/spec/template/spec/containers/0/ports"},
        {"op": "remove", "path": "/spec/template/spec/containers/0/startupProbe"},
        {"op": "remove", "path": "/spec/template/spec/containers/0/readinessProbe"},
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": image},
        {"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"},
        {
            "op": "replace",
            "path": "/spec/template/spec/containers/0/livenessProbe",
            "value": {"exec": {"command": [probe]}, "periodSeconds": 10, "timeoutSeconds": 5},
        },
        *({"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": k, "value": v}} for k, v in env.items()),
        {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": {"name": "ledger", "mountPath": "/ledger"}},
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/volumeMounts/-",
            "value": {"name": "tests", "mountPath": "/opt/tasks/tests", "readOnly": True},
        },
        {
            "op": "add",
            "path": "/spec/template/spec/volumes/-",
            "value": {"name": "ledger", "hostPath": {"path": str(ledger), "type": "Directory"}},
        },
        {
            "op": "add",
            "path": "/spec/template/spec/volumes/-",
            "value": {"name": "tests", "hostPath": {"path": str(ROOT / "tests"), "type": "Directory"}},
        },
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namePrefix": "kubeplay-",
        "resources": [os.path.relpath(KUBERNETES, out)],
        "patches": [{"target": {"kind": "Deployment"}, "patch": json.dumps(json_patch)}],
    }
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return out


def render(directory: Path) -> tuple[str, list[dict[str, Any]]]:
    text = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
    return text, [doc for doc in yaml.safe_load_all(text) if doc]


def get(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Pod:
    """The pod `podman kube play` makes of a manifest file, and its consumerd container (by id)."""

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest
        self.pod = self.container = ""

    def play(self) -> None:
        out = podman("kube", "play", "--replace", str(self.manifest)).stdout.split()
        self.pod, self.container = out[out.index("Pod:") + 1], out[out.index("Container:") + 1]

    def stop(self) -> float:
        """`podman pod stop -t GRACE`: SIGTERM, SIGKILL after GRACE, as kubelet does. The seconds it took."""
        started = time.monotonic()
        podman("pod", "stop", "-t", str(GRACE), self.pod, timeout=GRACE + 30)
        return time.monotonic() - started

    def exit_code(self) -> int:
        return int(podman("inspect", self.container, "--format", "{{.State.ExitCode}}").stdout)

    def logs(self) -> str:
        return podman("logs", self.container, check=False).stdout

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's log events named ``name`` (JSON lines: logging.format auto on a pipe)."""
        found = []
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the daemon's log ends:\n{self.logs()[-4000:]}")

    def remove(self) -> None:
        if self.pod:
            podman("pod", "rm", "-f", "-t", "0", self.pod, check=False)


def test_the_deployment_runs_probes_and_drains_under_podman_kube_play(image, emulator, broker, topic_sub, tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl renders deploy/kubernetes")
    topic, subscription = topic_sub(ack_deadline=10)
    port = free_port()
    ledger_dir = owned_dir(tmp_path / "ledger")  # the image's uid writes it
    ledger = Ledger(ledger_dir)
    text, docs = render(overlay(tmp_path, image, subscription, emulator.host, port, ledger_dir))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    manifest = tmp_path / "kube.yaml"
    manifest.write_text(text)

    pod = Pod(manifest)
    try:
        run_and_drain(pod, port, ledger, broker, topic, config_map)
    finally:
        pod.remove()


def run_and_drain(pod: Pod, port: int, ledger: Ledger, broker: Any, topic: str, config_map: dict[str, Any]) -> None:
    shipped = tomllib.loads(config_map["data"]["consumerd.toml"])
    pod.play()
    pod.wait_for(lambda: get(port, "/readyz") == 200, 90, "/readyz to answer 200")
    assert get(port, "/healthz") == 200
    health = podman("healthcheck", "run", pod.container, check=False)
    assert health.returncode == 0, f"the liveness probe failed: {health.stdout}{health.stderr}"

    # The ConfigMap is the config file, and what it sets (and no variable overrides) is in force.
    assert podman("exec", pod.container, "cat", "/etc/consumerd/consumerd.toml").stdout == config_map["data"]["consumerd.toml"]
    (starting,) = pod.events("daemon.starting")
    assert starting["config"] == "/etc/consumerd/consumerd.toml"
    assert [e["concurrency"] for e in pod.events("workers.starting")] == [shipped["workers"]["concurrency"]]
    assert set(podman("top", pod.container, "huser").stdout.split()[1:]) == {"10001"}, "runAsUser: every process is uid 10001"

    # One task longer than the drain, then short ones: the stop finds some running, some queued.
    (long_id,) = broker.publish(topic, data={"seconds": LONG_TASK}, task="sleep")
    short_ids = broker.publish(topic, count=SHORTS, data={"seconds": SHORT_TASK}, task="sleep")
    every = {long_id, *short_ids}
    pod.wait_for(
        lambda: long_id in ledger.ids("start") and len(ledger.ids("done")) >= 2, 60, "the long task to run and two short ones to finish"
    )

    first_stop = took = pod.stop()
    assert pod.exit_code() == 0, f"exit {pod.exit_code()} (137: SIGKILLed before the drain ended)"
    assert took < GRACE, f"the stop took {took:.1f} s, the grace is {GRACE} s"
    (drain,) = pod.events("drain.started")
    assert drain["drain_timeout"] == DRAIN
    assert pod.events("drain.timeout"), "the long task should have outlived the drain"
    done_before_stop = set(ledger.ids("done"))
    assert long_id not in done_before_stop and done_before_stop < every

    # The same pod again: what was given back (unstarted, or ended at the drain timeout) runs now.
    pod.play()
    pod.wait_for(lambda: set(ledger.ids("done")) == every, 90, "every message to be done")
    took = pod.stop()
    assert pod.exit_code() == 0
    starts = ledger.ids("start")
    again = {mid for mid in done_before_stop if starts.count(mid) > 1}
    assert again == set(), f"acked before the first stop, yet run again: {again}"
    assert starts.count(long_id) == 2 and ledger.ids("done").count(long_id) == 1
    print(
        f"\nkube play: {len(every)} messages, {len(done_before_stop)} done before the stop (which took {first_stop:.1f} s, "
        f"drain {DRAIN:.0f} s, grace {GRACE} s), the rest given back and done after (stop: {took:.1f} s)"
    )

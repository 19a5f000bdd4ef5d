"""What the image's daemon and its task code can do: its user, a read-only root, a hidden key."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from harness.daemon import REPO
from tests.container.runtime import UID, owned_dir, podman, wait_until
from tests.support.pubsub import Ledger, toml

pytestmark = pytest.mark.container
CREDENTIALS = "/run/credentials/consumerd"  # the image's CREDENTIALS_DIRECTORY
KEY = f"{CREDENTIALS}/key.json"


def test_runs_as_its_user_on_a_read_only_root_and_task_code_cannot_read_the_mounted_key(containers, broker, topic_sub, tmp_path, image):
    keys = owned_dir(tmp_path / "credentials", 0o500)
    key = keys / "key.json"
    key.write_text(json.dumps({"type": "service_account", "private_key": "not a real key"}))
    key.chmod(0o400)
    os.chown(key, UID, UID)  # the image user's own file: only Landlock stands between task code and it
    topic, sub = topic_sub()
    box = containers(sub, "sandbox", env={"CONSUMERD_PUBSUB__CREDENTIALS_FILE": "key.json"}, volumes=[f"{keys}:{CREDENTIALS}:ro"])
    box.wait_ready(timeout=60)

    # The image's user, for every process of the container (tini, the supervisor, fork server, workers).
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == f"{UID}:{UID}"
    rows = [line.split() for line in podman("top", box.name, "huser", "user").stdout.splitlines()[1:]]
    assert rows and all(row == [str(UID), "consumerd"] for row in rows), rows

    # A read-only root: nothing of the image can be changed, not even by its own user.
    write = box.exec("python", "-c", "open('/opt/consumerd/probe', 'w')")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    # The key is readable by that user outside the daemon (so what stops task code below is Landlock).
    assert box.exec("python", "-c", f"open({KEY!r}).read()").returncode == 0
    [hidden] = box.wait_for("workers.credentials_hidden", timeout=10)
    assert hidden["paths"] == [CREDENTIALS]

    probes = [
        broker.publish(topic, task="open_path", path=KEY)[0],
        broker.publish(topic, task="open_path", path="/etc/os-release")[0],
        broker.publish(topic, task="write_path", path="/etc/consumerd/probe")[0],
        broker.publish(topic, task="write_path", path="/ledger/probe")[0],
        broker.publish(topic, task="whoami")[0],
        broker.publish(topic, task="snoop")[0],
    ]
    ledger = Ledger(box.ledger.parent)
    wait_until(lambda: set(probes) <= set(ledger.ids("done")), 30, "the probe tasks")
    seen = {parts[0] for parts in ledger.lines()}
    expected = {
        f"denied:{KEY}:PermissionError",  # Landlock: task code cannot open the key
        "opened:/etc/os-release",  # ... and reads everything else as before
        "refused:/etc/consumerd/probe:Read-only_file_system",
        "wrote:/ledger/probe",  # volumes stay writable
        f"uid:{UID}",
        "env:CREDENTIALS_DIRECTORY:absent",
        "env:CONSUMERD_PUBSUB__CREDENTIALS_FILE:absent",
        "denied:environ:PermissionError",  # the supervisor is not dumpable: its environment stays its own
        "denied:mem:PermissionError",
    }
    assert expected <= seen, sorted(seen)

    # The operator's side: the control socket (in /tmp, a tmpfs) and the probes on the metrics port.
    status = box.exec("consumerd", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "running", status.stdout + status.stderr
    with urllib.request.urlopen(f"http://{box.metrics}/readyz", timeout=5) as reply:
        assert reply.status == 200
    seconds, code = box.stop_timed(30)
    print(
        f"\n[container] uid {UID} for all {len(rows)} processes; root read-only; the key hidden from task code by Landlock; "
        f"stop -> exit {code} in {seconds:.2f} s"
    )
    assert code == 0


def test_configured_by_a_mounted_toml_under_the_images_variables(image, tmp_path):
    config = tmp_path / "consumerd.toml"
    config.write_text(
        toml({"pubsub": {"subscription": "jobs"}, "workers": {"concurrency": 3}, "tasks": {"modules": ["tests.support.tasks"]}})
        + '[metrics]\nlisten = "127.0.0.1:1"\n'
    )
    config.chmod(0o644)
    run = ["run", "--rm", "--read-only", "--network=none", "-e", "GOOGLE_CLOUD_PROJECT=p", "-v", f"{REPO / 'tests'}:/opt/tasks/tests:ro"]
    checked = podman(*run, "-v", f"{config}:/etc/consumerd/consumerd.toml:ro", image, "check-config")
    # The effective settings (indented JSON) come after the fork server's one-line log events.
    settings = json.loads(checked.stdout[checked.stdout.index("{\n") :])["settings"]
    assert settings["workers"]["concurrency"] == 3  # from the file
    assert settings["metrics"]["listen"] == "0.0.0.0:9464"  # the image's variable wins over the file
    assert settings["logging"]["format"] == "auto" and settings["shutdown"]["drain_timeout"] == 20
    missing = podman(*run, "-e", "CONSUMERD_CONFIG=/etc/consumerd/missing.toml", image, "check-config", check=False)
    assert missing.returncode == 78 and "config file not found" in missing.stderr, missing.stderr

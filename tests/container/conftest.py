"""The OCI image (`make image`) under the real podman, against the emulator the tests start.

Each container shares this machine's loopback (--network=host, a free metrics port each), runs
with a read-only root file system as the image's user, imports the test task modules from this
checkout's tests/ mounted read-only on the image's module path (/opt/tasks), and writes its task
ledger into a directory of its own, mounted writable, that outlives it.

The image is used as `make image` left it (`make test-container` builds it first); without one,
dist/consumerd_VERSION.oci.tar is loaded, else `make image` runs. Skipped, with the reason, only
where podman is missing and cannot be installed (`make container-tools`: root and apt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumerd.testing.emulator import Emulator, free_port
from harness.daemon import PROJECT, REPO
from tests.container.runtime import ARCHIVE, IMAGE, Container, owned_dir, podman, podman_env

TASK_MODULES = ["tests.support.tasks", "tests.container.probe"]
ACK_DEADLINE = 10  # seconds: a killed container's messages come back this long after its last renewal
CONCURRENCY = 4  # per container


def _podman_missing() -> str:
    if shutil.which("podman"):
        return ""
    if os.geteuid() != 0:
        return "podman is not installed, and installing it (`make container-tools`) needs root"
    subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "container-tools"], capture_output=True, timeout=900)
    return "" if shutil.which("podman") else "podman is not installed and `make container-tools` (apt-get) could not install it"


@pytest.fixture(scope="session")
def image() -> str:
    if reason := _podman_missing():
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the container tests need root: rootful podman, volumes owned by the image's uid")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        if ARCHIVE.exists():
            podman("load", "--quiet", "--input", str(ARCHIVE), timeout=300)
        else:
            subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "image"], check=True, env=podman_env(), timeout=1200)
    return IMAGE


StartContainer = Callable[..., Container]


@pytest.fixture
def containers(image: str, emulator: Emulator, tmp_path: Path) -> Iterator[StartContainer]:
    """start(subscription, label, env=..., volumes=..., image=...): a running container of the image.

    Each is removed after the test, whatever happened; its ledger stays in tmp_path/label.
    """
    started: list[Container] = []

    def start(
        subscription: str, label: str, env: dict[str, str] | None = None, volumes: list[str] | None = None, image: str = image
    ) -> Container:
        ledger_dir = owned_dir(tmp_path / label)
        settings = {
            "PUBSUB_EMULATOR_HOST": emulator.host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "CONSUMERD_PUBSUB__SUBSCRIPTION": subscription,
            "CONSUMERD_TASKS__MODULES": json.dumps(TASK_MODULES),
            "CONSUMERD_METRICS__LISTEN": f"127.0.0.1:{free_port()}",  # the containers share the loopback
            "CONSUMERD_LEASES__ACK_DEADLINE": str(ACK_DEADLINE),
            "CONSUMERD_WORKERS__CONCURRENCY": str(CONCURRENCY),
            "TEST_LEDGER_DIR": "/ledger",
            **(env or {}),
        }
        mounts = [f"{REPO / 'tests'}:/opt/tasks/tests:ro", f"{ledger_dir}:/ledger:rw", *(volumes or [])]
        container = Container(image, f"consumerd-test-{os.getpid()}-{label}", settings, mounts, ledger_dir)
        started.append(container)
        container.start()
        return container

    yield start
    for container in started:
        container.remove()

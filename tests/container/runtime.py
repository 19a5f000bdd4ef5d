"""podman as the container tests use it: the project's containers.conf, and the image's daemon as a
harness.Daemon whose stop and kill go through podman, as an orchestrator's would.

A module of its own because the tests import it (a conftest module cannot be imported by name).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.daemon import REPO, Daemon

VERSION = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
IMAGE = f"localhost/consumerd:{VERSION}"
ARCHIVE = REPO / "dist" / f"consumerd_{VERSION}.oci.tar"
UID = 10001  # the image's USER (deploy/container/Containerfile)
IMAGE_CONFIG = Path("/etc/consumerd/consumerd.toml")  # CONSUMERD_CONFIG inside the image


def podman_env() -> dict[str, str]:
    """Every podman call of the project reads the project's containers.conf (runc, capped ulimits)."""
    return dict(os.environ, CONTAINERS_CONF=str(REPO / "deploy" / "container" / "containers.conf"))


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def owned_dir(path: Path, mode: int = 0o700) -> Path:
    """A directory of the image's user (and only its), for a volume the container writes or reads."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


class Container(Daemon):
    """`podman run IMAGE run --config ...` in the foreground: podman's stdout is the daemon's log.

    `stop` is `podman stop --time N` (SIGTERM to tini, which hands it to consumerd alone; SIGKILL
    to everything after N s), `kill` is `podman kill` (SIGKILL to every process at once).
    """

    def __init__(self, image: str, name: str, env: dict[str, str], volumes: list[str], ledger_dir: Path) -> None:
        command = ["podman", "run", "--rm", "--name", name, "--network=host", "--read-only"]
        for key, value in env.items():
            command += ["--env", f"{key}={value}"]
        for volume in volumes:
            command += ["--volume", volume]
        super().__init__(IMAGE_CONFIG, podman_env(), command=[*command, image])
        self.name = name
        self.ledger = ledger_dir / "ledger.txt"
        self.metrics = env.get("CONSUMERD_METRICS__LISTEN", "")  # HOST:PORT of /metrics, /healthz, /readyz

    def stop(self, timeout: float = 30) -> dict[str, Any] | None:
        self.stop_timed(timeout)
        return self.stopped_event()

    def stop_timed(self, timeout: float = 30) -> tuple[float, int]:
        """`podman stop --time timeout`: seconds until the container was gone, and its exit status."""
        started = time.monotonic()
        podman("stop", "--time", str(int(timeout)), self.name, check=False, timeout=timeout + 30)
        code = self.wait_exit(timeout + 30)
        return time.monotonic() - started, code

    def kill(self) -> None:
        podman("kill", self.name, check=False)
        self.wait_exit(30)

    def signal(self, signum: int) -> None:
        podman("kill", "--signal", str(signum), self.name)

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`podman exec`: a process of the image's user in the container, outside the daemon's sandbox."""
        return podman("exec", self.name, *argv, check=False)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 50 ms; the monotonic time it held, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic()

"""A real systemd for tests: PID 1 of a systemd-nspawn container over an overlay of this machine's /.

The guest shares the host's network (NET=host) so the service reaches the emulator the tests start
on 127.0.0.1. The checkout is bind-mounted read-only at /opt/src; `deploy/install.sh` installs it
in the guest exactly as on a real host. Skipped, with the reason, where such a guest cannot boot
(not root, no systemd-nspawn).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.daemon import PROJECT, REPO

HERE = Path(__file__).resolve().parent
STATE_DIR = "/var/lib/consumerd"  # the service's StateDirectory: the only place it may write


def _cannot_boot() -> str:
    if os.geteuid() != 0:
        return "needs root to boot a systemd-nspawn guest"
    for tool in ("systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install systemd-container; `make test` does)"
    return ""


class Guest:
    def __init__(self, name: str, binds: str = "") -> None:
        self.name = name
        self.sandbox = tempfile.mkdtemp(prefix="consumerd-sdbox-")
        self.leader = 0
        self.binds = binds  # more systemd-nspawn --bind options

    def boot(self) -> Guest:
        env = dict(os.environ, NET="host", SANDBOX_DIR=self.sandbox, BINDS=f"--bind-ro={REPO}:/opt/src {self.binds}".strip())
        out = subprocess.run([str(HERE / "boot.sh"), self.name], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"guest did not boot: {out.stderr[-2000:]}")
        self.leader = int(out.stdout.strip().splitlines()[-1])
        return self

    def teardown(self) -> None:
        subprocess.run([str(HERE / "teardown.sh"), self.name], env=dict(os.environ, SANDBOX_DIR=self.sandbox), timeout=120)

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"guest command failed ({result.returncode}): {command}\n{result.stdout}\n{result.stderr}")
        return result

    def show(self, unit: str = "consumerd") -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p ActiveState,SubState,StatusText,NRestarts,Result,MainPID,ExecMainStatus")
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def wait_until(self, predicate, timeout: float = 60, what: str = "condition") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; unit: {state}\n{self.journal_text()[-3000:]}")
            time.sleep(0.2)

    def journal(self, *filters: str) -> list[dict]:
        out = self.sh("journalctl -u consumerd -o json --no-pager " + " ".join(filters), check=False)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def journal_text(self) -> str:
        return self.sh("journalctl -u consumerd --no-pager -o short", check=False).stdout

    def ledger(self) -> list[list[str]]:
        out = self.sh(f"cat {STATE_DIR}/ledger.txt 2>/dev/null", check=False)
        return [line.split() for line in out.stdout.splitlines()]

    def ledger_ids(self, event: str) -> list[str]:
        return [parts[1] for parts in self.ledger() if parts[0] == event]

    def write(self, path: str, text: str) -> None:
        subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "sh", "-c", f"cat > {path}"],
            input=text,
            text=True,
            check=True,
            timeout=30,
        )


@pytest.fixture(scope="module")
def bare_guest(emulator) -> Iterator[Guest]:
    """A booted guest with nothing of consumerd installed, and the environment its unit reads."""
    reason = _cannot_boot()
    if reason:
        pytest.skip(reason)
    g = Guest(f"consumerd-test-{os.getpid()}").boot()
    try:
        g.write(
            "/etc/default/consumerd",
            f"PUBSUB_EMULATOR_HOST={emulator.host}\nGOOGLE_CLOUD_PROJECT={PROJECT}\nPYTHONPATH=/opt/src\nTEST_LEDGER_DIR={STATE_DIR}\n",
        )
        yield g
    finally:
        g.teardown()


@pytest.fixture(scope="module")
def guest(bare_guest) -> Guest:
    # Install exactly as an operator would, from the read-only checkout itself.
    bare_guest.sh("bash /opt/src/deploy/install.sh", timeout=600)
    return bare_guest


@pytest.fixture
def service(bare_guest, topic_sub):
    """A fresh subscription and config for the unit; the unit is stopped and reset afterwards."""

    def configure(ack_deadline: int = 10, **sections: dict) -> tuple[str, str]:
        topic, sub = topic_sub(ack_deadline=ack_deadline)
        settings = {
            "pubsub": {"subscription": sub},
            "workers": {"concurrency": 2, "task_timeout": 60},
            "leases": {"ack_deadline": 10},
            "shutdown": {"drain_timeout": 30},
            "tasks": {"modules": ["tests.support.tasks"]},
        }
        for section, values in sections.items():
            settings.setdefault(section, {}).update(values)
        from tests.support.pubsub import toml

        bare_guest.write("/etc/consumerd.toml", toml(settings))
        bare_guest.sh(f"rm -f {STATE_DIR}/ledger.txt; systemctl reset-failed consumerd 2>/dev/null; true", check=False)
        return topic, sub

    yield configure
    bare_guest.sh(
        "systemctl stop consumerd; systemctl reset-failed consumerd; rm -rf /etc/systemd/system/consumerd.service.d; systemctl daemon-reload",
        check=False,
    )

"""A fleet of consumerd hosts on one subscription: `make fleet` (`python -m bench.fleet`).

Boots three systemd guests (the nspawn sandbox of the system tests), installs the .deb in each and
points them all at one subscription on this machine's emulator (the guests share its loopback).
Then it measures I/O-bound throughput with 1, 2 and 3 hosts, and kills one host outright (SIGKILL
to the guest's PID 1: every process in it dies at once, nothing is drained or acked) in the middle
of a backlog: the others must finish its messages once their leases lapse, and nothing is lost.
Each host's task ledger lives in a host directory bound over the service's state directory, so it
survives the kill.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runner import create_subscription
from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.testing.emulator import Emulator
from harness.daemon import PROJECT, REPO
from tests.support.pubsub import toml
from tests.system.conftest import Guest

HOSTS = 3
CONCURRENCY = 4  # per host
TASK_SECONDS = 0.1  # I/O-bound: each host's ideal is CONCURRENCY / TASK_SECONDS msg/s
ACK_DEADLINE = 10


def done_counts(ledgers: list[Path]) -> dict[str, int]:
    """message id -> how many times a task finished it, across these hosts' ledger files.

    The fleet's check (also the container fleet's, tests/container): a published id missing here is
    lost; a count above 1 is a duplicate (at least once: a task finished, its ack did not)."""
    counts: dict[str, int] = {}
    for path in ledgers:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "done":
                    counts[parts[1]] = counts.get(parts[1], 0) + 1
    return counts


def tally(ids: list[str], counts: dict[str, int]) -> dict[str, int]:
    """The verdict on published ``ids`` given `done_counts`: how many never finished, how many twice."""
    published = set(ids)
    return {"lost": len(published - set(counts)), "duplicates": sum(c - 1 for i, c in counts.items() if c > 1 and i in published)}


def deb() -> Path:
    """The package built from this tree (`make deb` now, if it is not there yet)."""
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
    found = sorted((REPO / "dist").glob(f"consumerd_{version}_*.deb"))
    if not found:
        subprocess.run(["make", "deb"], cwd=REPO, check=True, capture_output=True, timeout=1200)
        found = sorted((REPO / "dist").glob(f"consumerd_{version}_*.deb"))
    assert found, "make deb made no package"
    return found[-1]


class Fleet:
    def __init__(self, emulator_host: str, workdir: Path, hosts: int = HOSTS) -> None:
        self.hosts = hosts
        self.host = emulator_host
        self.dir = workdir
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=emulator_host))
        self.publisher = self.adapter.batch_publisher()
        self.guests: list[Guest] = []
        self.serial = 0

    def boot(self, package: Path) -> None:
        """Boot and install every host at once (each guest has its own overlay and dpkg)."""
        with concurrent.futures.ThreadPoolExecutor(self.hosts) as pool:
            futures = [pool.submit(self._boot_one, i, package) for i in range(self.hosts)]
            failures = []
            for future in futures:  # in host order, so guests[i] is host i
                try:
                    self.guests.append(future.result())
                except Exception as exc:  # noqa: BLE001 - the others are kept for teardown(), then it is raised
                    failures.append(exc)
            if failures:
                raise failures[0]

    def _boot_one(self, i: int, package: Path) -> Guest:
        ledger = self.dir / f"host{i}"
        ledger.mkdir(parents=True)
        g = Guest(f"consumerd-fleet{i}-{os.getpid()}", binds=f"--bind={ledger}:/var/lib/private/consumerd").boot()
        try:
            g.sh("rm -f /usr/sbin/policy-rc.d")  # this machine's container image forbids service starts
            g.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /opt/src/dist/{package.name}", timeout=300)
            g.write(
                "/etc/default/consumerd",
                f"PUBSUB_EMULATOR_HOST={self.host}\nGOOGLE_CLOUD_PROJECT={PROJECT}\nPYTHONPATH=/opt/src\nTEST_LEDGER_DIR=/var/lib/consumerd\n",
            )
        except BaseException:
            g.teardown()
            raise
        return g

    def teardown(self) -> None:
        for g in self.guests:
            g.teardown()

    # -- one scenario --------------------------------------------------------------------------
    def subscription(self) -> tuple[str, str]:
        self.serial += 1
        return create_subscription(self.adapter, PROJECT, f"fleet-{self.serial}", ACK_DEADLINE)

    def configure(self, hosts: list[Guest], sub: str) -> None:
        settings = {
            "pubsub": {"subscription": sub},
            "workers": {"concurrency": CONCURRENCY, "task_timeout": 60},
            "leases": {"ack_deadline": ACK_DEADLINE},
            "shutdown": {"drain_timeout": 30},
            "tasks": {"modules": ["tests.support.tasks"]},
            "metrics": {"listen": "127.0.0.1:0"},  # the guests share this machine's loopback
        }
        for g in hosts:
            g.write("/etc/consumerd.toml", toml(settings))

    def publish(self, topic: str, n: int, seconds: float) -> list[str]:
        payload = json.dumps({"seconds": seconds}).encode()
        futures = [self.publisher.publish(topic, payload, task="sleep") for _ in range(n)]
        return [f.result(timeout=60) for f in futures]

    def done(self) -> dict[str, int]:
        """message id -> how many times a task finished it, across every host's ledger."""
        return done_counts([self.dir / f"host{i}" / "ledger.txt" for i in range(self.hosts)])

    def done_on(self, i: int) -> int:
        path = self.dir / f"host{i}" / "ledger.txt"
        return sum(1 for line in path.read_text().splitlines() if line.startswith("done ")) if path.exists() else 0

    def clear(self) -> None:
        for i in range(self.hosts):
            (self.dir / f"host{i}" / "ledger.txt").unlink(missing_ok=True)

    def wait_done(self, ids: list[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not set(ids) <= set(self.done()):
            if time.monotonic() > deadline:
                missing = set(ids) - set(self.done())
                raise RuntimeError(f"{len(missing)} of {len(ids)} messages never finished")
            time.sleep(0.1)
        return time.time()

    def throughput(self, k: int, n: int) -> dict:
        topic, sub = self.subscription()
        hosts = self.guests[:k]
        self.configure(hosts, sub)
        self.clear()
        for g in hosts:
            g.sh("systemctl start consumerd")  # returns at READY=1: all hosts wait on the empty subscription
        started = time.time()
        ids = self.publish(topic, n, TASK_SECONDS)
        finished = self.wait_done(ids, timeout=300)
        for g in hosts:
            g.sh("systemctl stop consumerd")
        return {"hosts": k, "messages": n, "msg_per_s": round(n / (finished - started), 1), "ideal": k * CONCURRENCY / TASK_SECONDS}

    def kill_one(self, n: int) -> dict:
        topic, sub = self.subscription()
        self.configure(self.guests, sub)
        self.clear()
        ids = self.publish(topic, n, 0.3)
        for g in self.guests:
            g.sh("systemctl start consumerd")
        while len(self.done()) < n // 3:
            time.sleep(0.05)
        victim = self.guests[0]
        done_before = len(self.done())
        killed_at = time.time()
        os.kill(victim.leader, signal.SIGKILL)  # the guest's PID 1: everything in it dies now
        finished = self.wait_done(ids, timeout=300)
        counts = self.done()
        for g in self.guests[1:]:
            g.sh("systemctl stop consumerd")
        return {
            "messages": n,
            "hosts": self.hosts,
            "done_before_kill": done_before,
            "done_per_host": [self.done_on(i) for i in range(self.hosts)],
            **tally(ids, counts),
            "finished_s_after_kill": round(finished - killed_at, 1),
            "ack_deadline_s": ACK_DEADLINE,
        }


def main() -> int:
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn"):
        print("fleet: needs root and systemd-nspawn (make systemd-sandbox)", file=sys.stderr)
        return 69
    package = deb()
    workdir = Path(tempfile.mkdtemp(prefix="consumerd-fleet-"))
    with Emulator(java_heap="2g") as emulator:
        fleet = Fleet(emulator.host, workdir)
        try:
            fleet.boot(package)
            scaling = [fleet.throughput(k, 800) for k in (1, 2, 3)]
            kill = fleet.kill_one(300)
        finally:
            fleet.teardown()
    result = {"package": package.name, "concurrency_per_host": CONCURRENCY, "task_seconds": TASK_SECONDS, "scaling": scaling, "kill": kill}
    out = REPO / "bench" / "results" / "fleet.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in scaling:
        print(f"  {row['hosts']} host(s): {row['msg_per_s']} msg/s (ideal {row['ideal']:.0f})")
    print(
        f"  one host SIGKILLed after {kill['done_before_kill']} of {kill['messages']}: lost {kill['lost']}, "
        f"all done {kill['finished_s_after_kill']} s later, {kill['duplicates']} duplicates"
    )
    growing = scaling[0]["msg_per_s"] < scaling[1]["msg_per_s"] < scaling[2]["msg_per_s"]
    ok = growing and kill["lost"] == 0
    print("OK: throughput grows with hosts and nothing was lost" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

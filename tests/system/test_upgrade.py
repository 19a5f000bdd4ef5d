"""An upgrade under load: the .deb of this tree installed with `dpkg -i` over an older version of
itself while consumerd.service and a consumerd@ instance work through a stream of tasks, some of
which outlast the drain. postinst restarts both: each drains (what runs finishes or is given back)
and comes back on the new version, and every message is done."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.fleet import deb
from harness.daemon import REPO
from tests.system.conftest import STATE_DIR, Guest

pytestmark = pytest.mark.system

OLDER = "~older"  # appended to this version: dpkg sorts 0.2.0~older before 0.2.0
DRAIN = 3  # shutdown.drain_timeout of both units: a short task (SHORT_S) ends well within it
SHORT_S = 1.0
HANGING = 2  # tasks per unit whose first run sleeps an hour (hang_once): the drain gives them back
RATE = 3  # short tasks published per second to each unit until the upgrade is over: more than it runs
INSTANCE = "upgrade"
TASKS_PATH = "/opt/upgrade-tasks"  # in the guest: holds only tests/ of the checkout, the units' PYTHONPATH


def version_of(package: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(package), "Version"], capture_output=True, text=True, check=True).stdout.strip()


def older_package(new: Path) -> Path:
    """`new` repacked as an older version of itself: the same files and maintainer scripts, the
    version lowered in DEBIAN/control and in consumerd.__version__ (the daemon logs it at start, so
    its journal tells which one runs). Two seconds, where building another package takes a minute;
    kept under build/ (which the guest sees at /opt/src), by the content of `new`."""
    key = hashlib.sha256(new.read_bytes()).hexdigest()[:16]
    version = version_of(new)
    out = REPO / "build" / "upgrade" / key / new.name.replace(f"_{version}_", f"_{version}{OLDER}_")
    if out.exists():
        return out
    shutil.rmtree(out.parent.parent, ignore_errors=True)  # another key's
    root = out.parent / "root"
    out.parent.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-R", str(new), str(root)], check=True)
    control = root / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}{OLDER}", control.read_text(), flags=re.M))
    (init,) = root.glob("opt/consumerd/lib/python3*/site-packages/consumerd/__init__.py")
    init.write_text(init.read_text().replace(f'__version__ = "{version}"', f'__version__ = "{version}{OLDER}"'))
    relative = str(init.relative_to(root))
    md5sums = root / "DEBIAN" / "md5sums"
    digest = hashlib.md5(init.read_bytes()).hexdigest()
    md5sums.write_text(re.sub(rf"^\w+  {re.escape(relative)}$", f"{digest}  {relative}", md5sums.read_text(), flags=re.M))
    partial = out.with_suffix(".partial")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(root), str(partial)], check=True, capture_output=True)
    shutil.rmtree(root)
    partial.rename(out)
    return out


@dataclass
class Unit:
    """One unit in the guest, with its subscription's topic and its own task ledger."""

    guest: Guest
    name: str
    topic: str
    ledger: str

    def pid(self) -> int:
        return int(self.guest.show(self.name)["MainPID"])

    def state(self) -> str:
        return self.guest.show(self.name)["ActiveState"]

    def events(self, event: str, pid: int) -> list[dict]:
        """Its journal's `event` entries logged by the process `pid`, oldest first."""
        out = self.guest.sh(f"journalctl -u {self.name} -o json --no-pager CONSUMERD_EVENT={event} _PID={pid}", check=False)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def ledger_ids(self, event: str) -> list[str]:
        out = self.guest.sh(f"cat {self.ledger} 2>/dev/null", check=False).stdout
        return [parts[1] for parts in (line.split() for line in out.splitlines()) if parts[0] == event]

    def journal_text(self) -> str:
        return self.guest.sh(f"journalctl -u {self.name} --no-pager -o short", check=False).stdout[-3000:]

    def wait_for(self, what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{self.name}: timed out waiting for {what}\n{self.journal_text()}"
            time.sleep(0.2)


class Stream:
    """Short tasks published to each unit's topic, RATE a second, from start() until stop()."""

    def __init__(self, broker, units: list[Unit]) -> None:
        self.broker = broker
        self.units = units
        self.ids: dict[str, list[str]] = {u.name: [] for u in units}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.wait(1 / RATE):
            for unit in self.units:
                self.ids[unit.name] += self.broker.publish(unit.topic, 1, data={"seconds": SHORT_S}, task="sleep")

    def start(self) -> Stream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(30)


def install(g: Guest, package: Path) -> None:
    g.sh("rm -f /usr/sbin/policy-rc.d")  # see test_package: the guest stands for a real host
    g.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /opt/src/{package.relative_to(REPO)}", timeout=300)
    # The units import the task modules from the checkout, but not its consumerd/: that would
    # shadow the packaged one, and the version running would be the checkout's.
    g.sh(f"mkdir -p {TASKS_PATH} && ln -sfn /opt/src/tests {TASKS_PATH}/tests")
    g.sh(f"sed -i 's|^PYTHONPATH=.*|PYTHONPATH={TASKS_PATH}|' /etc/default/consumerd")


def add_instance(g: Guest, sub: str, sub2: str) -> str:
    """consumerd@INSTANCE with consumerd.service's settings on subscription `sub2`; its ledger path.

    Its state and runtime directories go beside consumerd's, not into them: under DynamicUser,
    consumerd.service makes /var/lib/consumerd a link into /var/lib/private, where consumerd@NAME
    then cannot set up consumerd/NAME ("File exists"), and its stop would remove /run/consumerd
    with the instance's control socket in it."""
    g.sh(f"mkdir -p /etc/consumerd && sed 's|{sub}|{sub2}|' /etc/consumerd.toml > /etc/consumerd/{INSTANCE}.toml")
    g.sh(f"mkdir -p /etc/systemd/system/consumerd@{INSTANCE}.service.d")
    g.write(
        f"/etc/systemd/system/consumerd@{INSTANCE}.service.d/apart.conf",
        "[Service]\nStateDirectory=\nStateDirectory=consumerd-%i\nRuntimeDirectory=\nRuntimeDirectory=consumerd-%i\n",
    )
    g.sh("systemctl daemon-reload")
    g.write(f"/etc/default/consumerd-{INSTANCE}", f"TEST_LEDGER_DIR=/var/lib/consumerd-{INSTANCE}\n")
    return f"/var/lib/consumerd-{INSTANCE}/ledger.txt"


def remove_instance(g: Guest) -> None:
    g.sh(
        f"systemctl stop consumerd@{INSTANCE}; systemctl reset-failed consumerd@{INSTANCE}; "
        f"rm -rf /etc/systemd/system/consumerd@{INSTANCE}.service.d; systemctl daemon-reload",
        check=False,
    )


def test_an_upgrade_under_load_loses_nothing_and_every_unit_comes_back_on_the_new_version(bare_guest, service, topic_sub, broker):
    g = bare_guest
    new = deb()
    old = older_package(new)
    install(g, old)
    assert g.sh("dpkg-query -W -f='${Version}' consumerd").stdout == version_of(old)
    topic, sub = service(
        workers={"concurrency": 4, "task_timeout": 600},
        shutdown={"drain_timeout": DRAIN, "kill_grace": 1},
        metrics={"listen": "127.0.0.1:0"},  # two units on the loopback this machine shares with the guest
    )
    topic2, sub2 = topic_sub(ack_deadline=10)
    units = [
        Unit(g, "consumerd.service", topic, f"{STATE_DIR}/ledger.txt"),
        Unit(g, f"consumerd@{INSTANCE}.service", topic2, add_instance(g, sub, sub2)),
    ]
    stream = Stream(broker, units)
    try:
        started = g.sh(f"systemctl start {' '.join(u.name for u in units)}", check=False)
        assert started.returncode == 0, started.stderr + "".join(u.journal_text() for u in units)
        old_pids = {u.name: u.pid() for u in units}
        hanging = {u.name: broker.publish(u.topic, HANGING, task="hang_once") for u in units}
        for u in units:
            u.wait_for("the hanging tasks to start", lambda u=u: set(hanging[u.name]) <= set(u.ledger_ids("start")), 30)
        stream.start()
        time.sleep(3)
        began = time.monotonic()
        upgrade = g.sh(f"dpkg -i --force-confold /opt/src/{new.relative_to(REPO)}", timeout=300)
        upgrade_s = time.monotonic() - began
        time.sleep(2)  # the new daemons take some of the stream too
        stream.stop()

        assert g.sh("dpkg-query -W -f='${Version}' consumerd").stdout == version_of(new)
        assert g.sh("consumerd --version").stdout.strip() == f"consumerd {version_of(new)}"
        figures = {}
        for u in units:
            new_pid = on_the_new_version(u, old_pids[u.name], version_of(new), upgrade.stdout)
            ids = hanging[u.name] + stream.ids[u.name]
            u.wait_for("every message done", lambda u=u, ids=ids: set(ids) <= set(u.ledger_ids("done")), 120)  # none lost
            figures[u.name] = drained(u, old_pids[u.name], new_pid, hanging[u.name]) | {"messages": len(ids)}
    finally:
        stream.stop()
        remove_instance(g)
    print(f"\nupgrade: dpkg -i {upgrade_s:.1f} s; " + "; ".join(f"{name}: {f}" for name, f in figures.items()))


def on_the_new_version(u: Unit, old_pid: int, version: str, dpkg_output: str) -> int:
    """The unit is running again, in a new process that logged the new version; its main PID."""
    assert u.state() == "active", f"{u.name} did not come back\n{dpkg_output}\n{u.journal_text()}"
    pid = u.pid()
    assert pid != old_pid, f"{u.name} was not restarted"
    assert [e["CONSUMERD_VERSION"] for e in u.events("daemon.starting", old_pid)] == [version + OLDER]
    assert [e["CONSUMERD_VERSION"] for e in u.events("daemon.starting", pid)] == [version]
    exe = u.guest.sh(f"readlink /proc/{pid}/exe").stdout.strip()
    assert not exe.endswith("(deleted)"), exe  # the interpreter file dpkg put there, not the one it replaced
    return pid


def drained(u: Unit, old_pid: int, new_pid: int, hanging: list[str]) -> dict[str, float]:
    """What the old daemon's drain did, from the journal: the tasks still running at its deadline
    (the hanging ones) were ended and given back, and the new daemon finished them; the others that
    ran when it began finished within it. Its figures."""
    (started,) = u.events("drain.started", old_pid)
    (timeout,) = u.events("drain.timeout", old_pid)
    (stopped,) = u.events("daemon.stopped", old_pid)
    assert int(timeout["CONSUMERD_RUNNING"]) == len(hanging)
    after = int(started["__REALTIME_TIMESTAMP"])
    ended = [e for e in u.events("message.failed", old_pid) if int(e["__REALTIME_TIMESTAMP"]) >= after]
    assert sorted(e["CONSUMERD_MESSAGE_ID"] for e in ended) == sorted(hanging), [e["MESSAGE"] for e in ended]
    assert {e["CONSUMERD_OUTCOME"] for e in ended} == {"interrupted"}
    done_old = u.events("message.done", old_pid)
    done_new = u.events("message.done", new_pid)
    assert set(hanging) <= {e["CONSUMERD_MESSAGE_ID"] for e in done_new}
    finished = sum(1 for e in done_old if int(e["__REALTIME_TIMESTAMP"]) >= after)
    assert finished + len(ended) >= int(started["CONSUMERD_RUNNING"])  # each task running at the drain: one or the other
    done = u.ledger_ids("done")
    return {
        "running_at_drain": int(started["CONSUMERD_RUNNING"]),
        "finished_in_drain": finished,
        "given_back_running": len(ended),
        "given_back_unstarted": int(started["CONSUMERD_GIVEN_BACK"]),
        "drain_s": round((int(stopped["__REALTIME_TIMESTAMP"]) - after) / 1e6, 2),
        "done_by_old": len(done_old),
        "done_by_new": len(done_new),
        "repeats": len(done) - len(set(done)),
    }

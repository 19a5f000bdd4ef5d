"""Instances that coexist (issue 19): two `consumerd@` instances whose configs set only their
subscription both run on one host, and the Debian package's Prometheus, run by its own unit with the
documented scrape config, finds and scrapes both through the entries the units keep in
/run/consumerd-sd."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
import urllib.request

import pytest

from consumerd.testing.emulator import free_port
from harness.daemon import REPO

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not shutil.which("prometheus"), reason="Debian package prometheus not installed (make test installs it)"),
]
NAMES = ("emails", "thumbnails")
SD = "/run/consumerd-sd"


def documented_scrape_config() -> str:
    """The snippet docs/observability.md gives for several instances on one host, verbatim."""
    section = (REPO / "docs" / "observability.md").read_text().split("### Several instances on one host", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return snippet


def api(port: int, path: str) -> dict:
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5))


def wait_for_targets(guest, port: int, expected: dict[str, str], timeout: float = 30) -> None:
    """Until Prometheus has scraped exactly the expected targets (subscription -> address), all up."""
    deadline, active = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            active = api(port, "targets?state=active")["data"]["activeTargets"]
        except OSError:
            active = []  # not listening yet
        if (
            {t["labels"].get("subscriptions"): t["labels"]["instance"] for t in active if t["health"] == "up"}
            == expected
            == {t["labels"].get("subscriptions"): t["labels"]["instance"] for t in active}
        ):
            return
        time.sleep(0.3)
    journal = guest.sh("journalctl -u prometheus --no-pager -o cat | tail -30", check=False).stdout
    raise AssertionError(f"Prometheus did not find {expected} up within {timeout}s: {active}\n{journal}")


def wait_unit(guest, unit: str, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(state := guest.show(unit)):
        assert time.monotonic() < deadline, f"{unit}: {state}"
        time.sleep(0.1)


def entries(guest) -> dict[str, dict]:
    """/run/consumerd-sd's files by name: each one target group."""
    names = guest.sh(f"ls -A {SD}", check=False).stdout.split()
    return {name: json.loads(guest.sh(f"cat {SD}/{name}").stdout)[0] for name in names}


def test_two_instances_with_only_their_subscription_run_and_prometheus_scrapes_both(guest, topic_sub):
    g = guest
    # What every instance on the host shares: the emulator (the guest's /etc/default/consumerd), the tasks.
    g.sh("""echo 'CONSUMERD_TASKS__MODULES=["tests.support.tasks"]' >> /etc/default/consumerd""")
    subscriptions = {}
    for name in NAMES:
        _, sub = topic_sub()
        subscriptions[name] = sub.rpartition("/")[2]
        g.write(f"/etc/consumerd/{name}.toml", f'[pubsub]\nsubscription = "{subscriptions[name]}"\n')
    port, tsdb = free_port(), "/var/lib/prometheus/consumerd-test"
    g.sh("mkdir -p /etc/consumerd-test && cp /opt/src/deploy/prometheus/alerts.yml /etc/prometheus/consumerd-alerts.yml")
    g.write("/etc/consumerd-test/prometheus.yml", "global: {scrape_interval: 1s, evaluation_interval: 1s}\n" + documented_scrape_config())
    args = f"--config.file=/etc/consumerd-test/prometheus.yml --storage.tsdb.path={tsdb} --web.listen-address=127.0.0.1:{port}"
    g.write("/etc/default/prometheus", f'ARGS="{args}"\n')  # loopback only: the guest shares this machine's network
    units = " ".join(f"consumerd@{name}" for name in NAMES)
    try:
        g.sh(f"systemctl start {units}")  # Type=notify: returns once both sent READY=1 and ran ExecStartPost
        for name in NAMES:
            state = g.show(f"consumerd@{name}")
            assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0"), state
        found = entries(g)
        assert sorted(found) == [f"consumerd@{name}.json" for name in NAMES]
        addresses = {name: found[f"consumerd@{name}.json"]["targets"][0] for name in NAMES}
        assert {name: found[f"consumerd@{name}.json"]["labels"] for name in NAMES} == {
            n: {"subscriptions": s} for n, s in subscriptions.items()
        }
        # Which one has 9464 is a race, and neither may: `make test` runs daemons on this network at the same time.
        assert len(set(addresses.values())) == 2 and all(a.startswith("127.0.0.1:") for a in addresses.values()), addresses
        assert g.sh(f"stat -c %a {SD}/consumerd@{NAMES[0]}.json {SD}").stdout.split() == ["644", "755"]
        for name in NAMES:
            out = g.sh(f"journalctl -u consumerd@{name} -o json --no-pager CONSUMERD_EVENT=metrics.listening").stdout
            [listening] = [json.loads(line) for line in out.splitlines()]
            assert (listening["CONSUMERD_REQUESTED"], listening["CONSUMERD_ADDRESS"]) == ("127.0.0.1:9464", addresses[name]), listening

        # The Debian package's own unit (user prometheus, PrivateUsers=yes) with the documented snippet.
        g.sh(f"install -d -o prometheus -g prometheus {tsdb} && systemctl restart prometheus")
        wait_for_targets(g, port, {subscriptions[name]: addresses[name] for name in NAMES})
        up = api(port, "query?query=" + urllib.parse.quote('count(up{job="consumerd"} == 1)'))["data"]["result"]
        assert [float(r["value"][1]) for r in up] == [2.0]

        # Killed, an instance keeps its entry: Prometheus finds it down until it is back (and found again).
        killed = NAMES[0]
        g.sh(f"systemctl kill -s KILL consumerd@{killed}")
        wait_unit(g, f"consumerd@{killed}", lambda state: state["SubState"] == "auto-restart")  # RestartSec=2: ExecStopPost ran
        assert f"consumerd@{killed}.json" in entries(g)
        wait_unit(g, f"consumerd@{killed}", lambda state: (state["NRestarts"], state["SubState"]) == ("1", "running"))
        addresses[killed] = entries(g)[f"consumerd@{killed}.json"]["targets"][0]
        wait_for_targets(g, port, {subscriptions[name]: addresses[name] for name in NAMES})
        was_down = api(port, "query?query=" + urllib.parse.quote(f'min(min_over_time(up{{subscriptions="{subscriptions[killed]}"}}[5m]))'))
        assert [float(r["value"][1]) for r in was_down["data"]["result"]] == [0.0], was_down

        # Stopped cleanly, an instance takes its entry away, and Prometheus its target.
        g.sh(f"systemctl stop consumerd@{killed}")
        assert sorted(entries(g)) == [f"consumerd@{NAMES[1]}.json"]
        wait_for_targets(g, port, {subscriptions[NAMES[1]]: addresses[NAMES[1]]})
    finally:
        g.sh(f"systemctl stop prometheus {units}; systemctl reset-failed {units}; rm -rf {tsdb} {SD}", check=False)

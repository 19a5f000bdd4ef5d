"""The operations kit against the real thing: Prometheus scraping a daemon, promtool, the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from consumerd.testing.emulator import free_port
from harness.daemon import REPO

pytestmark = pytest.mark.integration
DEPLOY = REPO / "deploy"
needs_prometheus = pytest.mark.skipif(
    not shutil.which("prometheus"), reason="Debian package prometheus not installed (make test installs it)"
)


SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "info": ("_info",)}


def exported_names(exposition: str) -> set[str]:
    """Sample names, and every name a declared family (# TYPE) exposes, even before its first sample."""
    names = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and not line.startswith("#")}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names |= {family, *(family + suffix for suffix in SUFFIXES.get(kind, ()))}
    return names


@needs_prometheus
def test_prometheus_scrapes_the_daemon_and_counts_what_the_tasks_did(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    daemon = make_daemon(sub)
    [listening] = daemon.wait_for("metrics.listening")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{DEPLOY / 'prometheus' / 'alerts.yml'}]\n"
        f"scrape_configs:\n  - job_name: consumerd\n    static_configs: [{{targets: ['{listening['address']}']}}]\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ids = broker.publish(topic, 30, task="ok") + broker.publish(topic, 5, task="raise_once")
        daemon.wait_for_ids("message.done", set(ids), timeout=60)
        succeeded = len(ledger.ids("done"))
        assert succeeded == 35
        query = 'sum(consumerd_messages_total{outcome="success"})'
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            seen = _query(port, query)
            if seen == succeeded:
                break
            time.sleep(0.5)
        assert seen == succeeded, f"Prometheus saw {seen}, the tasks recorded {succeeded}"
        assert _query(port, 'up{job="consumerd"}') == 1
        assert _query(port, 'sum(consumerd_messages_total{outcome="error", task="raise_once"})') == 5
        rules = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5))
        assert len(rules["data"]["groups"][0]["rules"]) == 6  # the alert rules load in the real Prometheus
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    try:
        body = json.load(urllib.request.urlopen(url, timeout=5))
    except OSError:
        return None
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (make test installs prometheus)")
def test_alert_rules_pass_their_promtool_unit_tests():
    checked = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 6 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_dashboard_query_names_a_metric_the_daemon_exports(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="ok")
    daemon = make_daemon(sub)
    daemon.wait_for("message.done", message_id=mid)
    [listening] = daemon.wait_for("metrics.listening")
    exposition = urllib.request.urlopen(f"http://{listening['address']}/metrics", timeout=5).read().decode()
    exported = exported_names(exposition)
    dashboard = json.loads((DEPLOY / "grafana" / "consumerd.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {name for expr in exprs for name in re.findall(r"\b((?:consumerd|process)_[a-z_]+)\b", expr)}
    assert len(exprs) >= 15 and len(named) >= 15
    assert sorted(named - exported) == [], "dashboard queries name metrics the daemon does not export"
    lines = (DEPLOY / "prometheus" / "alerts.yml").read_text().splitlines()
    rules = "\n".join(line for line in lines if not line.strip().startswith(("summary:", "description:", "#")))
    in_rules = set(re.findall(r"\b((?:consumerd|process)_[a-z_]+)\b", rules))
    assert sorted(in_rules - exported) == []

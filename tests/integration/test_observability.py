"""Issue 10: metrics, probes, `consumerd status` and the control socket, on the real daemon and emulator."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import consumerd
from consumerd.testing.emulator import Emulator
from harness.daemon import REPO

pytestmark = pytest.mark.integration
FAST_RETRY = {"min_backoff": 0, "max_backoff": 0}


def get(daemon, path: str) -> tuple[int, str]:
    [event] = daemon.wait_for("metrics.listening")
    try:
        with urllib.request.urlopen(f"http://{event['address']}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(daemon, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def until(probe, done, timeout: float = 5.0):
    """Probe until ``done(result)``; the loop publishes what the probes read once per tick (<= 1 s)."""
    deadline = time.monotonic() + timeout
    while not done(result := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def control(socket_path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "consumerd", *args, "--socket", str(socket_path)]
    if user:
        command = ["setpriv", f"--reuid={pwd.getpwnam(user).pw_uid}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_metrics_count_a_known_workload(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    dl_topic, _ = topic_sub()
    ok = broker.publish(topic, 20, task="ok")
    flaky = broker.publish(topic, 5, task="raise_once")
    crashing = broker.publish(topic, 2, task="exit_once")
    [slow] = broker.publish(topic, data={"seconds": 7}, task="sleep")  # outlives 60 % of the 10 s lease: renewed
    [unknown] = broker.publish(topic, task="no_such_task")
    [rejected] = broker.publish(topic, task="reject")
    daemon = make_daemon(sub, retry={"min_backoff": 0, "max_backoff": 0}, dead_letter={"topic": dl_topic})
    name = sub.rpartition("/")[2]  # the per-message series carry the subscription they came from
    daemon.wait_for_ids("message.done", set(ok + flaky + crashing + [slow]), timeout=60)
    daemon.wait_for_ids("message.dead_lettered", {unknown, rejected})
    found = samples(daemon)
    assert value(found, "consumerd_dead_lettered_total", subscription=name, task="reject") == 1
    assert value(found, "consumerd_dead_lettered_total", subscription=name, task="unknown") == 1
    assert value(found, "consumerd_messages_total", subscription=name, task="exit_once", outcome="crash") == 2
    assert value(found, "consumerd_worker_exits_total", cause="exit_nonzero") == 2
    assert value(found, "consumerd_lease_renewals_total") >= 1
    assert value(found, "consumerd_lease_lapsed_total") == 0
    assert value(found, "consumerd_messages_total", subscription=name, task="ok", outcome="success") == 20
    assert value(found, "consumerd_messages_total", subscription=name, task="raise_once", outcome="success") == 5
    assert value(found, "consumerd_messages_total", subscription=name, task="raise_once", outcome="error") == 5
    assert value(found, "consumerd_messages_total", subscription=name, task="unknown", outcome="unknown_task") == 1
    assert value(found, "consumerd_task_duration_seconds_count", task="ok") == 20
    assert value(found, "consumerd_task_duration_seconds_count", task="raise_once") == 10
    assert value(found, "consumerd_task_duration_seconds_count", task="exit_once") == 4  # crashes count their run time too
    assert value(found, "consumerd_delivery_attempt_count") == 20 + 10 + 4 + 1 + 2
    assert value(found, "consumerd_build_info", version=consumerd.__version__) == 1
    assert value(found, "consumerd_rpc_total", rpc="pull") >= 1 and value(found, "consumerd_rpc_total", rpc="ack") >= 1
    assert value(found, "consumerd_state", state="running") == 1 and value(found, "consumerd_state", state="draining") == 0
    assert value(found, "process_resident_memory_bytes") > 10_000_000
    time.sleep(2.1)  # gauges refresh with STATUS=, every 2 s
    found = samples(daemon)
    assert value(found, "consumerd_workers") == 2 and value(found, "consumerd_concurrency") == 2
    assert value(found, "consumerd_tasks_running") == 0 and value(found, "consumerd_utilization") == 0
    # promtool, Prometheus's own checker, accepts the exposition as it is.
    exposition = get(daemon, "/metrics")[1]
    checked = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_health_and_readiness_follow_the_states(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    socket_path = tmp_path / "control.sock"
    daemon = make_daemon(
        sub,
        tasks={"modules": ["tests.support.tasks", "tests.support.slow_tasks"]},
        control={"socket": str(socket_path)},
        env={"SLOW_IMPORT_SECONDS": "3"},
    )
    assert get(daemon, "/readyz") == (503, "starting\n")  # the fork server is still importing
    assert get(daemon, "/healthz")[0] == 200
    daemon.wait_for("daemon.ready")
    assert get(daemon, "/readyz") == (200, "ready\n")
    assert control(socket_path, "pause").returncode == 0
    assert get(daemon, "/readyz") == (503, "paused\n") and get(daemon, "/healthz")[0] == 200
    assert control(socket_path, "resume").returncode == 0
    assert get(daemon, "/readyz")[0] == 200
    [mid] = broker.publish(topic, data={"seconds": 3}, task="sleep")
    while mid not in ledger.ids("start"):
        time.sleep(0.05)
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("drain.started")
    assert get(daemon, "/readyz") == (503, "draining\n") and get(daemon, "/healthz")[0] == 200
    daemon.wait_exit(30)


def test_readyz_fails_while_pubsub_is_frozen_and_healthz_does_not(broker, tmp_path, make_daemon):
    with Emulator() as own:  # frozen below: not the session's emulator
        from tests.support.pubsub import Broker

        local = Broker(own.host)
        _, sub = local.create()
        daemon = make_daemon(sub, host=own.host, pubsub={"subscription": sub, "pull_timeout": 4})
        daemon.wait_for("daemon.ready")
        assert get(daemon, "/readyz")[0] == 200
        own.signal(signal.SIGSTOP)
        try:
            daemon.wait_for("pubsub.pull_failed", timeout=60)  # the long poll times out (pubsub.pull_timeout)
            status, reason = until(lambda: get(daemon, "/readyz"), lambda r: r[0] == 503)  # the next tick publishes it
            assert status == 503 and reason.startswith("Pub/Sub unreachable")
            assert get(daemon, "/healthz")[0] == 200
            assert value(samples(daemon), "consumerd_rpc_errors_total", rpc="pull", code="DEADLINE_EXCEEDED") >= 1
        finally:
            own.signal(signal.SIGCONT)
        daemon.wait_for("pubsub.pull_recovered", timeout=60)
        assert until(lambda: get(daemon, "/readyz"), lambda r: r[0] == 200)[0] == 200
        daemon.stop()
        local.close()


def test_status_shows_a_running_task_within_a_second(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    socket_path = tmp_path / "control.sock"
    daemon = make_daemon(sub, control={"socket": str(socket_path)})
    daemon.wait_for("daemon.ready")
    [mid] = broker.publish(topic, data={"seconds": 10}, task="sleep")
    while mid not in ledger.ids("start"):
        time.sleep(0.02)
    started = time.monotonic()
    answer = json.loads(control(socket_path, "status", "--json").stdout)
    assert time.monotonic() - started < 1.0
    [job] = answer["running"]
    assert job["message_id"] == mid and job["task"] == "sleep" and job["attempt"] >= 0 and job["rss_kb"] > 1000
    assert answer["state"] == "running" and answer["concurrency"] == 2 and answer["workers"] == 2
    found = until(lambda: samples(daemon), lambda f: value(f, "consumerd_tasks_running") == 1)  # gauges: every 2 s
    assert value(found, "consumerd_utilization") == 0.5 and value(found, "consumerd_held_bytes") > 0
    table = control(socket_path, "status").stdout
    assert mid in table and "sleep" in table and "state: running" in table
    # Process titles say what each process is and does.
    titles = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip() for pid in _tree(daemon.pid)}
    assert titles[daemon.pid].startswith(f"consumerd: supervisor [{sub.rpartition('/')[2]}]")
    assert any(t == "consumerd: fork server" for t in titles.values())
    assert any(t.startswith("consumerd: worker") and t.endswith(f"sleep {mid}") for t in titles.values()), titles
    assert any(t.startswith("consumerd: worker") and t.endswith("idle") for t in titles.values()), titles
    daemon.kill()  # rather than drain the 10 s task: nothing is checked after it


def _tree(pid: int) -> list[int]:
    from harness.procinfo import descendants

    return [pid, *(child for child, _ in descendants(pid))]


def test_pause_keeps_new_messages_in_pubsub_and_resume_takes_them(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    socket_path = tmp_path / "control.sock"
    daemon = make_daemon(sub, control={"socket": str(socket_path)})
    daemon.wait_for("daemon.ready")
    assert json.loads(control(socket_path, "pause", "--json").stdout) == {"ok": True, "paused": True}
    ids = broker.publish(topic, 5, task="ok")
    deadline = time.monotonic() + 3  # a negative check needs a bound: nothing may start while paused
    while time.monotonic() < deadline:
        assert not set(ledger.ids("start")) & set(ids)
        time.sleep(0.1)
    control(socket_path, "resume")
    daemon.wait_for_ids("message.done", set(ids), timeout=30)
    assert control(socket_path, "scale", "3").returncode == 0
    daemon.wait_for("workers.resized", concurrency=3)
    refused = control(socket_path, "scale", "0")
    assert refused.returncode == 1 and "whole number of workers" in refused.stderr
    drained = control(socket_path, "drain")
    assert drained.returncode == 0 and daemon.wait_exit(30) == 0


def test_the_control_socket_refuses_other_users(broker, topic_sub, make_daemon, tmp_path):
    _, sub = topic_sub()
    public = Path(tempfile.mkdtemp(prefix="consumerd-control-"))
    public.chmod(0o755)  # any user may reach the sockets: their own modes are what guard them
    owner_only, shared = public / "owner.sock", public / "shared.sock"
    first = make_daemon(sub, control={"socket": str(owner_only)})
    second = make_daemon(sub, control={"socket": str(shared), "group": "nogroup"})
    first.wait_for("daemon.ready"), second.wait_for("daemon.ready")
    assert oct(owner_only.stat().st_mode & 0o777) == "0o600" and oct(shared.stat().st_mode & 0o777) == "0o660"
    denied = control(owner_only, "status", user="nobody")
    assert denied.returncode == 1 and "Permission denied" in denied.stderr
    allowed = control(shared, "status", "--json", user="nobody")  # nobody's group is nogroup: may read
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["state"] == "running"
    change = control(shared, "pause", user="nobody")  # ...but not change anything
    assert change.returncode == 1 and "permission denied" in change.stderr

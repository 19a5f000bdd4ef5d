"""Several subscriptions in one daemon, one worker pool, against the emulator: weights and
max_concurrency (from the tasks' own ledger), five at once, a missing one, pause/resume/drain of
one, a dead-letter topic each, and one deleted mid-run while the others go on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.daemon import REPO, Daemon, daemon_env
from tests.support.pubsub import toml
from tests.support.stream_tasks import ledger, peak_running

pytestmark = pytest.mark.integration
MODULES = ["tests.support.stream_tasks", "tests.support.tasks"]


@pytest.fixture
def streams_daemon(emulator, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(subscriptions: list[dict[str, Any]], concurrency: int = 4, **sections: dict[str, Any]) -> Daemon:
        settings: dict[str, Any] = {
            "workers": {"concurrency": concurrency, "task_timeout": 60},
            "leases": {"ack_deadline": 10},
            "shutdown": {"drain_timeout": 30},
            "tasks": {"modules": MODULES, "default": "stream_sleep"},
            "logging": {"format": "json", "level": "info"},
            "control": {"socket": str(tmp_path / f"control-{len(started)}.sock")},
            **sections,
            "subscriptions": subscriptions,
        }
        config = tmp_path / f"streams-{len(started)}.toml"
        config.write_text(toml(settings))
        daemon = Daemon(config, daemon_env(emulator.host, tmp_path)).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


def control(daemon: Daemon, *args: str) -> dict[str, Any]:
    sock = next(e["socket"] for e in daemon.select("control.listening"))
    out = subprocess.run(
        [sys.executable, "-m", "consumerd", *args, "--socket", sock, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_until(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def done_by(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event, _, sub, _ in ledger(tmp_path):
        if event == "done":
            counts[sub] = counts.get(sub, 0) + 1
    return counts


def test_two_flooded_subscriptions_share_the_workers_three_to_one(broker, topic_sub, streams_daemon, tmp_path):
    (t_a, s_a), (t_b, s_b) = topic_sub(), topic_sub()
    broker.publish(t_a, 120, seconds="0.25")
    broker.publish(t_b, 120, seconds="0.25")
    daemon = streams_daemon([{"name": s_a, "weight": 3}, {"name": s_b, "weight": 1}])
    wait_until(lambda: sum(done_by(tmp_path).values()) >= 100, 60, "100 tasks done")
    # After the first pulls (whichever came first had the pool to itself for a moment), while both
    # still have a backlog: 80 completions, 20 per worker slot.
    entries = [e for e in ledger(tmp_path) if e[0] == "done"][20:100]
    a = sum(1 for e in entries if e[2] == s_a.rpartition("/")[2])
    b = len(entries) - a
    assert 2.7 <= a / b <= 3.3, (a, b)
    daemon.stop()


def test_max_concurrency_is_never_exceeded_and_message_subscription_names_the_source(broker, topic_sub, streams_daemon, tmp_path):
    (t_a, s_a), (t_b, s_b) = topic_sub(), topic_sub()
    ids_a = broker.publish(t_a, 12, seconds="0.3")
    ids_b = broker.publish(t_b, 12, seconds="0.3")
    daemon = streams_daemon([{"name": s_a, "weight": 10, "max_concurrency": 1}, {"name": s_b}])
    daemon.wait_for_ids("message.done", set(ids_a + ids_b), timeout=60)
    entries = ledger(tmp_path)
    name_a, name_b = s_a.rpartition("/")[2], s_b.rpartition("/")[2]
    assert peak_running(entries, name_a) == 1
    assert peak_running(entries, name_b) >= 2  # the slots the capped one may not use went to the other
    assert {mid for _, mid, sub, _ in entries if sub == name_a} == set(ids_a)


def test_five_subscriptions_in_one_daemon_each_have_their_status_and_metrics(broker, topic_sub, streams_daemon, tmp_path):
    pairs = [topic_sub() for _ in range(5)]
    ids = {sub: broker.publish(topic, 8, seconds="0.05") for topic, sub in pairs}
    daemon = streams_daemon([{"name": sub} for _, sub in pairs], concurrency=3)
    daemon.wait_for_ids("message.done", {m for group in ids.values() for m in group}, timeout=60)
    status = control(daemon, "status")
    assert [s["subscription"] for s in status["subscriptions"]] == [sub for _, sub in pairs]
    assert all(s["counters"]["succeeded"] == 8 for s in status["subscriptions"])
    address = daemon.select("metrics.listening")[0]["address"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    for _, sub in pairs:
        name = sub.rpartition("/")[2]
        assert f'consumerd_messages_total{{outcome="success",subscription="{name}",task="stream_sleep"}} 8.0' in text
    stopped = daemon.stop()
    assert stopped is not None and stopped["succeeded"] == 40


def test_a_subscription_that_does_not_exist_is_exit_78_naming_it(topic_sub, streams_daemon):
    _, sub = topic_sub()
    daemon = streams_daemon([{"name": sub}, {"name": "no-such-subscription"}])
    assert daemon.wait_exit() == 78
    assert "no-such-subscription does not exist" in "".join(daemon.raw)


def test_pause_resume_and_drain_one_subscription_while_the_other_goes_on(broker, topic_sub, streams_daemon, tmp_path):
    (t_a, s_a), (t_b, s_b) = topic_sub(), topic_sub()
    daemon = streams_daemon([{"name": s_a}, {"name": s_b}])
    daemon.wait_ready()
    assert control(daemon, "pause", "--subscription", s_b.rpartition("/")[2])["paused"] is True
    time.sleep(0.5)  # a pull already sent may still bring messages: they run; nothing is asked for after
    mark = daemon.mark()
    ids_b = broker.publish(t_b, 3, seconds="0")
    ids_a = broker.publish(t_a, 3, seconds="0")
    daemon.wait_for_ids("message.done", set(ids_a), since=mark)
    time.sleep(2)
    assert not [e for e in daemon.select("message.done", since=mark) if e["message_id"] in ids_b]
    control(daemon, "resume", "--subscription", s_b)
    daemon.wait_for_ids("message.done", set(ids_b), since=mark)
    control(daemon, "drain", "--subscription", s_b)
    wait_until(lambda: not control(daemon, "status")["subscriptions"][1]["pulling"], 10, "b's puller to stop")
    later = broker.publish(t_a, 3, seconds="0")
    daemon.wait_for_ids("message.done", set(later))
    assert control(daemon, "status")["state"] == "running"  # the daemon and the other subscription go on


def test_each_subscription_dead_letters_to_its_own_topic(broker, topic_sub, streams_daemon):
    (t_a, s_a), (t_b, s_b) = topic_sub(), topic_sub()
    (dl_a, dl_a_sub), (dl_b, dl_b_sub) = topic_sub(), topic_sub()
    [mid_a] = broker.publish(t_a, task="stream_reject")
    [mid_b] = broker.publish(t_b, task="stream_reject")
    daemon = streams_daemon([{"name": s_a, "dead_letter": {"topic": dl_a}}, {"name": s_b, "dead_letter": {"topic": dl_b}}])
    daemon.wait_for_ids("message.dead_lettered", {mid_a, mid_b})
    [copy_a] = broker.pull_messages(dl_a_sub, timeout=10)
    [copy_b] = broker.pull_messages(dl_b_sub, timeout=10)
    assert copy_a.attributes["consumerd_original_message_id"] == mid_a and copy_a.attributes["consumerd_subscription"] == s_a
    assert copy_b.attributes["consumerd_original_message_id"] == mid_b and copy_b.attributes["consumerd_subscription"] == s_b


def test_a_subscription_deleted_mid_run_is_logged_and_counted_while_the_others_go_on(broker, topic_sub, streams_daemon):
    (t_a, s_a), (_, s_b) = topic_sub(), topic_sub()
    daemon = streams_daemon([{"name": s_a}, {"name": s_b}])
    daemon.wait_ready()
    broker.adapter.subscriber.delete_subscription(request={"subscription": s_b})
    [failed] = daemon.wait_for("pubsub.pull_failed", subscription=s_b.rpartition("/")[2], timeout=40)
    assert "NotFound" in failed["error"]
    ids = broker.publish(t_a, 10, seconds="0")
    daemon.wait_for_ids("message.done", set(ids))
    address = daemon.select("metrics.listening")[0]["address"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert 'consumerd_rpc_errors_total{code="NOT_FOUND",rpc="pull"}' in text


def test_a_quiet_subscription_is_not_starved_by_a_flood_of_short_tasks(broker, topic_sub, streams_daemon, tmp_path):
    (t_flood, s_flood), (t_quiet, s_quiet) = topic_sub(), topic_sub()
    flood = broker.publish(t_flood, 300, seconds="0.02")  # short tasks: each worker has one queued behind the running one
    daemon = streams_daemon([{"name": s_flood}, {"name": s_quiet}], concurrency=2)
    wait_until(lambda: done_by(tmp_path).get(s_flood.rpartition("/")[2], 0) >= 20, 30, "the flood under way")
    quiet = broker.publish(t_quiet, 5, seconds="0")
    published = time.time()
    daemon.wait_for_ids("message.done", set(quiet), timeout=30)
    flood_left = len(flood) - done_by(tmp_path).get(s_flood.rpartition("/")[2], 0)
    assert flood_left > 0  # the quiet ones ran during the flood, not after it
    for mid in quiet:
        finished = next(t for e, m, _, t in ledger(tmp_path) if e == "done" and m == mid)
        assert finished - published < 2.0, (mid, finished - published)

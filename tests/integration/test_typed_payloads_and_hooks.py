"""Issue 22: typed payloads, task hooks and the Sentry recipe on the real daemon and the real emulator."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from tests.support.sentry import events, sentry  # noqa: F401 - the loopback stand-in for Sentry

pytestmark = pytest.mark.integration
TYPED = {"modules": ["tests.support.typed_tasks"]}
FAST_RETRY = {"min_backoff": 0, "max_backoff": 1}
GOOD = {"order_id": "o-1", "amount": 3}
INVALID = {"order_id": "o-2", "amount": -1}


def hook_lines(tmp_path: Path) -> list[str]:
    try:
        return (tmp_path / "hooks.txt").read_text().splitlines()
    except FileNotFoundError:
        return []


def publish_mix(broker, topic: str) -> dict[str, list[str]]:
    return {
        "good": broker.publish(topic, data=GOOD, task="typed_order"),
        "invalid": broker.publish(topic, data=INVALID, task="typed_order") + broker.publish(topic, data=b"{not json", task="typed_order"),
        "rows": broker.publish(topic, 4, data=GOOD, task="typed_rows"),
        "bad_row": broker.publish(topic, data={"amount": 1}, task="typed_rows"),
        "flaky": broker.publish(topic, data=GOOD, task="typed_raise_once"),
    }


def run_mix(broker, topic_sub, make_daemon, tmp_path: Path, **env: str):
    topic, sub = topic_sub()
    dl_topic, dl_sub = topic_sub()
    ids = publish_mix(broker, topic)
    daemon = make_daemon(sub, tasks=TYPED, retry=FAST_RETRY, dead_letter={"topic": dl_topic}, env=env)
    daemon.wait_for_ids("message.done", {*ids["good"], *ids["rows"], *ids["flaky"]}, timeout=60)
    rejected = {*ids["invalid"], *ids["bad_row"]}
    daemon.wait_for_ids("message.dead_lettered", rejected, timeout=60)
    return daemon, ids, dl_sub


def check_fates(daemon, broker, ids, dl_sub, ledger) -> None:
    """Each message's fate, whatever the hooks did."""
    rejected = {*ids["invalid"], *ids["bad_row"]}
    failed = collections.Counter(e["message_id"] for e in daemon.select("message.failed"))
    assert all(failed[mid] == 1 for mid in ids["flaky"]) and not [m for m in failed if m not in {*ids["flaky"], *rejected}]
    copies = {c.attributes["consumerd_original_message_id"]: dict(c.attributes) for c in broker.pull_messages(dl_sub, timeout=10)}
    assert set(copies) == rejected  # dead-lettered once each, never retried
    invalid, not_json = ids["invalid"]
    assert copies[invalid]["consumerd_outcome"] == "reject"
    assert copies[invalid]["consumerd_error"].startswith("PayloadError: payload is not a valid Order: 1 validation error: amount:")
    assert "Invalid JSON" in copies[not_json]["consumerd_error"]
    assert "order_id: Field required" in copies[ids["bad_row"][0]]["consumerd_error"]
    ran = set(ledger.ids("done")) | set(ledger.ids("start"))
    assert not ran & rejected  # the task never saw an invalid payload
    assert set(ledger.ids("order=o-1")) >= {*ids["good"], *ids["rows"]}


def test_typed_payloads_are_validated_rejected_alone_and_the_hooks_run_once_per_outcome(broker, topic_sub, make_daemon, ledger, tmp_path):
    daemon, ids, dl_sub = run_mix(broker, topic_sub, make_daemon, tmp_path)
    check_fates(daemon, broker, ids, dl_sub, ledger)
    lines = hook_lines(tmp_path)
    successes = collections.Counter(line.split()[1] for line in lines if line.startswith("success"))
    assert successes == collections.Counter([*ids["good"], *ids["rows"], *ids["flaky"]])
    failures = sorted(line.split(" ", 2)[1:] for line in lines if line.startswith("failure"))
    rejected = [*ids["invalid"], *ids["bad_row"]]
    assert failures == sorted([[mid, "1 dead_letter PayloadError"] for mid in rejected] + [[ids["flaky"][0], "1 retry ValueError"]])
    assert not daemon.select("hook.failed")


def test_hooks_that_raise_are_logged_and_change_no_messages_fate(broker, topic_sub, make_daemon, ledger, tmp_path):
    daemon, ids, dl_sub = run_mix(broker, topic_sub, make_daemon, tmp_path, RAISING_HOOKS="1")
    check_fates(daemon, broker, ids, dl_sub, ledger)
    outcomes = 1 + 2 + 4 + 1 + 2  # good, invalid, rows, bad_row, flaky (a failure, then a success)
    failed_hooks = daemon.wait_for("hook.failed", count=outcomes)
    assert {e["hook"] for e in failed_hooks} == {"noted_failure", "noted_success"}
    assert {e["error"] for e in failed_hooks} == {
        "RuntimeError: the failure hook fails on purpose",
        "RuntimeError: the success hook fails on purpose",
    }
    assert len(hook_lines(tmp_path)) == outcomes  # each hook still ran exactly once per outcome
    stopped = daemon.stop()
    assert stopped is not None and stopped["dead_lettered"] == 3


def test_the_sentry_recipe_reports_a_failed_attempt_from_a_real_worker(broker, topic_sub, make_daemon, sentry):  # noqa: F811
    dsn, received = sentry
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, data=GOOD, task="typed_raise_once")
    daemon = make_daemon(sub, tasks=TYPED, retry=FAST_RETRY, env={"SENTRY_DSN": dsn})
    daemon.wait_for("message.done", message_id=mid, timeout=60)
    deadline = time.monotonic() + 15
    while not events(received) and time.monotonic() < deadline:
        time.sleep(0.1)
    [event] = events(received)
    assert event["tags"]["task"] == "typed_raise_once" and event["tags"]["message_id"] == mid and event["tags"]["fate"] == "retry"
    assert event["exception"]["values"][-1]["type"] == "ValueError"


def test_publish_with_task_validates_then_publishes_with_the_route_attribute(broker, topic_sub, emulator, tmp_path):
    import json
    import subprocess
    import sys

    from harness.daemon import daemon_env

    topic, sub = topic_sub()
    config = tmp_path / "publish.toml"
    config.write_text('[tasks]\nmodules = ["tests.support.typed_tasks"]\n')
    env = daemon_env(emulator.host, tmp_path)

    def publish(payload: dict) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "consumerd", "publish", "--config", str(config), "--topic", topic, "--task", "typed_order"]
        return subprocess.run([*argv, json.dumps(payload)], env=env, capture_output=True, text=True, timeout=60)

    refused = publish(INVALID)
    assert refused.returncode == 65 and "not published: task 'typed_order': payload is not a valid Order" in refused.stderr
    assert broker.pull_messages(sub, timeout=3) == []  # nothing went out
    sent = publish(GOOD)
    assert sent.returncode == 0, sent.stderr
    [message] = broker.pull_messages(sub, timeout=10)
    assert message.message_id == sent.stdout.strip() and dict(message.attributes) == {"task": "typed_order"}
    assert json.loads(message.data) == GOOD

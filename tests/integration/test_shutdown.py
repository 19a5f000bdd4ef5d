"""Stopping: SIGTERM drains, a second SIGTERM stops at once, nothing is lost either way."""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.integration


def _wait_started(ledger, ids, timeout=30):
    deadline = time.monotonic() + timeout
    while set(ledger.ids("start")) < set(ids):
        assert time.monotonic() < deadline, f"tasks did not start: {ledger.lines()}"
        time.sleep(0.05)


def test_sigterm_drains_running_tasks_then_exits_0(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(ack_deadline=10)
    ids = broker.publish(topic, 2, data={"seconds": 3}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 2})
    _wait_started(ledger, ids)
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("drain.started")
    assert daemon.wait_exit(30) == 0
    done = daemon.select("message.done", outcome="success")
    assert sorted(e["message_id"] for e in done) == sorted(ids)
    assert sorted(ledger.ids("done")) == sorted(ids)
    assert broker.pull_ids(sub, timeout=12) == [], "drained messages must have been acked"


def test_second_sigterm_stops_quickly_and_nacks_unfinished(broker, topic_sub, make_daemon, ledger):
    # A 600 s subscription deadline: a prompt redelivery can only be the daemon's nack.
    topic, sub = topic_sub(ack_deadline=600)
    ids = broker.publish(topic, 2, data={"seconds": 300}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 2})
    _wait_started(ledger, ids)
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("drain.started")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert time.monotonic() - started < 10
    failed = daemon.select("message.failed")
    assert sorted(e["message_id"] for e in failed) == sorted(ids)
    assert ledger.ids("done") == []
    assert {e["outcome"] for e in failed} == {"interrupted"}
    assert _pull_until(broker, sub, set(ids), within=5) == set(ids), "unfinished messages must come back at once"


def test_sigterm_gives_back_messages_not_yet_started(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(ack_deadline=600)
    ids = broker.publish(topic, 6, data={"seconds": 2}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 2})
    deadline = time.monotonic() + 30
    while len(ledger.ids("start")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    finished = set(ledger.ids("done"))
    assert set(ledger.ids("start")) == finished, "every started task finished during the drain"
    rest = set(ids) - finished
    # Not started: given back (nack) at once, not held until the 600 s deadline.
    assert _pull_until(broker, sub, rest, within=10) == rest


def _pull_until(broker, sub, wanted, within):
    got = set()
    deadline = time.monotonic() + within
    while got < wanted and (remaining := deadline - time.monotonic()) > 0:
        got |= set(broker.pull_ids(sub, timeout=min(3, max(remaining, 1.5))))
    return got

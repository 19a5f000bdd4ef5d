"""The whole path of a message, real daemon against the real emulator."""

from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.integration


def test_ready_then_watchdog_pings(topic_sub, make_daemon, notify_socket):
    _, sub = topic_sub()
    daemon = make_daemon(sub, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"})
    seen = notify_socket.wait_for(lambda m: sum("WATCHDOG=1" in x for x in m) >= 3, timeout=30)
    first_ready = next(i for i, m in enumerate(seen) if "READY=1" in m)
    first_ping = next(i for i, m in enumerate(seen) if "WATCHDOG=1" in m)
    assert first_ready < first_ping, "WATCHDOG before READY"
    assert any(m.startswith("STATUS=running") or "STATUS=running" in m for m in seen)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert any("STOPPING=1" in m for m in notify_socket.wait_for(lambda m: any("STOPPING=1" in x for x in m)))


def test_500_messages_concurrency_4_all_acked_none_lost(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 500, task="ok")
    daemon = make_daemon(sub, workers={"concurrency": 4})
    done = daemon.wait_for("message.done", count=500, timeout=120, outcome="success")
    assert {e["message_id"] for e in done} == set(ids)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert sorted(ledger.ids("done")) == sorted(ids), "each message ran to completion exactly once"
    # Acked for real: nothing comes back even after the 10 s ack deadline has passed.
    assert broker.pull_ids(sub, timeout=12) == []
    for event in done:
        assert {"message_id", "task", "attempt", "worker_pid", "duration_ms", "outcome"} <= event.keys()


def test_task_running_3x_ack_deadline_is_not_redelivered(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(ack_deadline=10)
    [mid] = broker.publish(topic, data={"seconds": 30}, task="sleep")
    daemon = make_daemon(sub, leases={"ack_deadline": 10}, workers={"concurrency": 2, "task_timeout": 120})
    [event] = daemon.wait_for("message.done", timeout=90, outcome="success")
    assert event["message_id"] == mid and event["duration_ms"] >= 30_000  # renewed at least 3 times
    assert ledger.ids("start") == [mid], "the message was redelivered while its task ran"
    assert not daemon.select("message.failed")
    assert broker.pull_ids(sub, timeout=12) == []


def test_task_that_raises_is_retried_then_succeeds(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="raise_once")
    daemon = make_daemon(sub)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "error" and "ValueError" in failed["error"]
    [done] = daemon.wait_for("message.done", message_id=mid, timeout=60)
    assert done["attempt"] == 2
    assert ledger.ids("done") == [mid]


@pytest.mark.parametrize("task", ["exit_once", "sigkill_once"])
def test_crashed_worker_message_is_redelivered_and_daemon_keeps_going(broker, topic_sub, make_daemon, ledger, task):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task=task)
    daemon = make_daemon(sub)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "crash"
    expected = "exited with code 1" if task == "exit_once" else "killed by SIGKILL"
    assert failed["error"] == expected
    daemon.wait_for("message.done", message_id=mid, timeout=60)
    [after] = broker.publish(topic, task="ok")
    daemon.wait_for("message.done", message_id=after)
    assert sorted(ledger.ids("done")) == sorted([mid, after])
    assert daemon.process.poll() is None


def test_task_past_timeout_is_killed_and_retried(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="hang_once")
    daemon = make_daemon(sub, workers={"task_timeout": 2})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "timeout" and 2000 <= failed["duration_ms"] < 10_000
    daemon.wait_for("message.done", message_id=mid, timeout=60)
    assert ledger.ids("done") == [mid]

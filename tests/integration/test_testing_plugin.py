"""consumerd's pytest plugin as a project's tests use it: the real daemon on their task modules."""

from __future__ import annotations

import time

import pytest

from consumerd.testing import TaskOutcome

pytestmark = pytest.mark.integration

MODULE = "tests.support.parity_tasks"


def test_the_daemon_fixture_publishes_waits_reports_and_dead_letters(consumerd_daemon, dead_letters):
    daemon = consumerd_daemon([MODULE], workers={"concurrency": 2}, retry={"min_backoff": 0, "max_backoff": 0})
    ok = daemon.publish({"order": 1}, task="parity_ok")
    later = daemon.publish(b"", task="parity_retry", after="40")
    bad = daemon.publish(b"", task="parity_reject")
    boom = daemon.publish(b"", task="parity_boom")
    assert daemon.wait_for(ok) == TaskOutcome(ok, "success", acked=True)
    assert daemon.wait_for(later) == TaskOutcome(later, "retry", retry_after=40.0)
    assert daemon.wait_for(bad) == TaskOutcome(bad, "reject", rejected="Reject: this order can never be charged")
    assert daemon.wait_for(boom) == TaskOutcome(boom, "error", failed="ValueError: the gateway said no")
    assert daemon.wait_for(boom, attempt=2).failed == "ValueError: the gateway said no"  # retried at once (backoff 0)

    copy = dead_letters.wait_for(bad)
    assert copy.attributes["consumerd_error"] == "Reject: this order can never be charged"
    assert copy.attributes["consumerd_task"] == "parity_reject" and copy.topic.endswith("-dead")

    status = daemon.status()
    assert status["state"] == "running" and status["counters"]["succeeded"] == 1 and status["counters"]["dead_lettered"] == 1


def test_several_daemons_and_the_ini_default(consumerd_daemon):
    with pytest.raises(pytest.UsageError, match="name the task modules"):
        consumerd_daemon()  # this project sets no consumerd_modules
    first, second = consumerd_daemon([MODULE]), consumerd_daemon([MODULE])
    ids = {first.publish(b"[1]", task="parity_aio_ok") for _ in range(6)}

    def done() -> set[str]:  # one subscription, shared: each message is done by one of the two
        return {e["message_id"] for d in (first, second) for e in d.select("message.done")}

    deadline = time.monotonic() + 30
    while done() != ids:
        assert time.monotonic() < deadline, f"done: {done()}, published: {ids}"
        time.sleep(0.05)
    assert second.stop() == 0 and first.stop() == 0

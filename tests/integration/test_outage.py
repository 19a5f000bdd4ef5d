"""Pub/Sub trouble under a running daemon: a frozen emulator, then a stopped and restarted one."""

from __future__ import annotations

import signal
import time

import pytest

from consumerd.testing.emulator import Emulator
from tests.support.pubsub import Broker

pytestmark = pytest.mark.integration


@pytest.fixture
def own_emulator():
    emu = Emulator().start()
    yield emu
    emu.stop()


def test_frozen_then_restarted_emulator(own_emulator, make_daemon, ledger):
    emu = own_emulator
    broker = Broker(emu.host)
    topic, sub = broker.create(ack_deadline=10)
    daemon = make_daemon(sub, host=emu.host)
    daemon.wait_for("daemon.ready")

    # Frozen for longer than the ack deadline while a task runs: the task's result is acked once
    # the emulator is back, and nothing is lost.
    [mid] = broker.publish(topic, data={"seconds": 2}, task="sleep")
    _wait(lambda: mid in ledger.ids("start"))
    emu.signal(signal.SIGSTOP)
    time.sleep(12)  # the fault itself: a freeze longer than the 10 s ack deadline
    emu.signal(signal.SIGCONT)
    daemon.wait_for("message.done", message_id=mid, timeout=90)
    [after_freeze] = broker.publish(topic, task="ok")
    daemon.wait_for("message.done", message_id=after_freeze, timeout=60)

    # Stopped: the daemon stays up and retries; restarted (empty, it keeps nothing in memory) and
    # set up again: the daemon resumes by itself and processes everything published since.
    emu.stop()
    daemon.wait_for("pubsub.pull_failed", timeout=60)
    restarted = daemon.mark()  # the new emulator numbers message ids from 1 again
    emu.start()
    broker2 = Broker(emu.host)
    broker2.adapter.ensure_topic(topic)
    broker2.adapter.subscriber.create_subscription(request={"name": sub, "topic": topic, "ack_deadline_seconds": 10})
    ids = broker2.publish(topic, 20, task="ok")
    # (A redelivery from before the outage may still finish and be logged here: at least once.)
    daemon.wait_for_ids("message.done", set(ids), timeout=90, since=restarted, outcome="success")
    assert daemon.process.poll() is None, "the daemon must survive the outage"
    assert len(ledger.ids("done")) >= len(ids) + 2
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    broker.close()
    broker2.close()


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)

"""The image processes a backlog, drains on `podman stop`, and loses nothing to `podman kill`."""

from __future__ import annotations

import time

import pytest

from bench.fleet import done_counts, tally
from tests.container.conftest import ACK_DEADLINE
from tests.container.runtime import wait_until
from tests.support.pubsub import Ledger

pytestmark = pytest.mark.container
TASK = {"data": {"seconds": 0.1}, "task": "sleep"}  # tests/support/tasks.py: start, sleep, done


def test_podman_stop_drains_within_the_grace_and_a_later_container_finishes_the_rest(containers, broker, topic_sub):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 500, **TASK)
    first = containers(sub, "first")
    first.wait_ready(timeout=60)
    wait_until(lambda: len(done_counts([first.ledger])) >= 150, 60, "150 messages done by the first container")
    seconds, code = first.stop_timed(30)
    drain = first.select("drain.started")[-1]
    stopped = first.stopped_event()
    assert code == 0, first.stderr[-2000:]
    assert seconds < 30 and not first.select("drain.timeout")  # drained, never SIGKILLed
    # Every task the first container started, it finished: none was cut off by the stop.
    ledger = Ledger(first.ledger.parent)
    assert set(ledger.ids("start")) == set(ledger.ids("done"))

    second = containers(sub, "second")
    second.wait_ready(timeout=60)
    wait_until(lambda: set(ids) <= set(done_counts([first.ledger, second.ledger])), 120, "all 500 done")
    second.stop_timed(30)
    verdict = tally(ids, done_counts([first.ledger, second.ledger]))
    first_done = len(done_counts([first.ledger]))
    print(
        f"\n[container] podman stop --time 30 -> exit {code} in {seconds:.2f} s (drain: {drain['running']} held by workers, "
        f"{drain['given_back']} given back); {first_done} done before the stop, the rest by a second container: "
        f"lost {verdict['lost']}, duplicates {verdict['duplicates']} (daemon.stopped: {stopped and stopped.get('succeeded')} succeeded)"
    )
    assert verdict == {"lost": 0, "duplicates": 0}  # acked once each: the drain flushed its acks


def test_podman_kill_loses_nothing_a_second_container_finishes_after_the_leases_lapse(containers, broker, topic_sub):
    topic, sub = topic_sub(ack_deadline=ACK_DEADLINE)
    ids = broker.publish(topic, 300, **TASK)
    first = containers(sub, "killed")
    first.wait_ready(timeout=60)
    wait_until(lambda: len(done_counts([first.ledger])) >= 100, 60, "100 messages done before the kill")
    first.kill()
    killed_at = time.monotonic()
    assert first.process is not None and first.process.returncode == 137  # SIGKILL: nothing drained, nothing flushed
    ledger = Ledger(first.ledger.parent)
    cut_off = set(ledger.ids("start")) - set(ledger.ids("done"))

    second = containers(sub, "after-kill")
    second.wait_ready(timeout=60)
    finished = wait_until(lambda: set(ids) <= set(done_counts([first.ledger, second.ledger])), 120, "all 300 done")
    second.stop_timed(30)
    verdict = tally(ids, done_counts([first.ledger, second.ledger]))
    print(
        f"\n[container] podman kill after {len(done_counts([first.ledger]))} of {len(ids)} done ({len(cut_off)} cut off mid-task): "
        f"lost {verdict['lost']}, duplicates {verdict['duplicates']}, all done {finished - killed_at:.1f} s after the kill"
    )
    assert verdict["lost"] == 0
    assert cut_off <= set(done_counts([second.ledger]))  # the tasks the kill cut off ran again, to the end

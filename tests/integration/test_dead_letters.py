"""Dead-letter copies against the emulator: a permanent publish failure is logged, counted, and held."""

from __future__ import annotations

import itertools

import pytest

from harness.daemon import PROJECT

pytestmark = pytest.mark.integration
_n = itertools.count(1)


def test_a_deleted_dead_letter_topic_is_a_permanent_failure_logged_counted_and_held(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    dl_topic = f"projects/{PROJECT}/topics/dead-letters-gone-{next(_n)}"
    broker.adapter.ensure_topic(dl_topic)
    daemon = make_daemon(sub, dead_letter={"topic": dl_topic})
    daemon.wait_for("daemon.ready")
    broker.adapter.publisher.delete_topic(request={"topic": dl_topic})  # permission revoked, topic deleted...
    [mid] = broker.publish(topic, task="reject")
    [failed] = daemon.wait_for("message.dead_letter_failed", message_id=mid)
    assert failed["permanent"] is True and "NotFound" in failed["error"] and failed["retry_in_s"] == 600
    assert not daemon.select("message.dead_lettered")  # never acked without a copy
    assert len(daemon.select("dead_letter.retry")) == 0  # not retried as if it were transient
    stopped = daemon.stop()
    assert stopped is not None and stopped["dead_letter_failed"] == 1 and stopped["dead_lettered"] == 0


def test_a_message_with_150_attributes_and_a_non_ascii_error_makes_a_copy_within_the_limits(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    dl_topic, dl_sub = topic_sub()
    attributes = {f"a{i:03}": "v" for i in range(149)}
    [mid] = broker.publish(topic, task="reject", **attributes)
    daemon = make_daemon(sub, dead_letter={"topic": dl_topic})
    daemon.wait_for("message.dead_lettered", message_id=mid)
    response = broker.adapter.subscriber.pull(request={"subscription": dl_sub, "max_messages": 1}, timeout=10)
    [copy] = response.received_messages
    attrs = dict(copy.message.attributes)
    assert len(attrs) == 100 and "consumerd_folded_attributes" in attrs
    assert all(len(v.encode()) <= 1024 for v in attrs.values())
    assert attrs["consumerd_original_message_id"] == mid

"""Delivery semantics against the real emulator: delays, dead letters, poison, exactly-once, ordering, budgets."""

from __future__ import annotations

import datetime
import signal

import pytest

from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from harness.daemon import PROJECT

pytestmark = pytest.mark.integration


def ts(event) -> datetime.datetime:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))


@pytest.fixture
def dead_letter(broker, topic_sub):
    """A dead-letter topic with a subscription the test reads it through."""
    topic, sub = topic_sub()
    return topic, sub


def test_task_requested_retry_delay_is_honoured(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, data={"after": 3}, task="retry_after")
    daemon = make_daemon(sub)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["outcome"] == "retry" and failed["retry_in_s"] == 3
    [done] = daemon.wait_for("message.done", message_id=mid, timeout=30)
    assert (ts(done) - ts(failed)).total_seconds() >= 2.5
    assert done["attempt"] == 2


def test_failures_back_off_from_min_backoff(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="raise_once")
    daemon = make_daemon(sub, retry={"min_backoff": 2, "max_backoff": 2})
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["retry_in_s"] == 2
    [done] = daemon.wait_for("message.done", message_id=mid, timeout=30)
    assert (ts(done) - ts(failed)).total_seconds() >= 1.5


def test_reject_is_forwarded_to_the_dead_letter_topic_then_acked(broker, topic_sub, make_daemon, dead_letter):
    topic, sub = topic_sub()
    dl_topic, dl_sub = dead_letter
    [mid] = broker.publish(topic, data=b"poison", task="reject", extra="kept")
    daemon = make_daemon(sub, dead_letter={"topic": dl_topic})
    [event] = daemon.wait_for("message.dead_lettered", message_id=mid)
    [copy] = broker.pull_messages(dl_sub, timeout=10)
    assert copy.data == b"poison"
    attrs = dict(copy.attributes)
    assert attrs["extra"] == "kept" and attrs["task"] == "reject"
    assert attrs["consumerd_task"] == "reject" and attrs["consumerd_outcome"] == "reject"
    assert attrs["consumerd_original_message_id"] == mid and attrs["consumerd_subscription"] == sub
    assert attrs["consumerd_attempt"] == "1" and "never succeed" in attrs["consumerd_error"]
    assert event["dead_letter_message_id"] == copy.message_id
    assert broker.pull_ids(sub, timeout=12) == [], "the original must be acked after forwarding"


def test_unknown_task_bad_payload_and_oversized_messages_are_rejects(broker, topic_sub, make_daemon, dead_letter):
    topic, sub = topic_sub()
    dl_topic, dl_sub = dead_letter
    unknown = broker.publish(topic, task="no_such_task")[0]
    no_route = broker.publish(topic, data=b"no task attribute")[0]
    not_json = broker.publish(topic, data=b"\xff\xfe not json", task="parse")[0]
    too_big = broker.publish(topic, data=b"x" * 5000, task="ok")[0]
    daemon = make_daemon(sub, dead_letter={"topic": dl_topic}, flow={"max_message_bytes": 4096})
    daemon.wait_for_ids("message.dead_lettered", {unknown, no_route, not_json, too_big})
    outcomes = {}
    for _ in range(5):
        for m in broker.pull_messages(dl_sub, timeout=5):
            outcomes[m.attributes["consumerd_original_message_id"]] = m.attributes["consumerd_outcome"]
        if len(outcomes) == 4:
            break
    assert outcomes == {unknown: "unknown_task", no_route: "unknown_task", not_json: "reject", too_big: "too_large"}


def test_reject_without_dead_letter_topic_comes_back_after_the_maximum_backoff(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="reject")
    daemon = make_daemon(sub, retry={"min_backoff": 1, "max_backoff": 3})
    first, second = daemon.wait_for("message.failed", count=2, message_id=mid, timeout=30)
    assert first["level"] == "error" and first["retry_in_s"] == 3
    assert (ts(second) - ts(first)).total_seconds() >= 2.5, "never silently dropped, never spinning"


def test_max_attempts_stops_a_crash_loop(broker, topic_sub, make_daemon, dead_letter, ledger):
    topic, sub = topic_sub()
    dl_topic, dl_sub = dead_letter
    [mid] = broker.publish(topic, task="always_crash")
    daemon = make_daemon(sub, dead_letter={"topic": dl_topic, "max_attempts": 3}, retry={"min_backoff": 0, "max_backoff": 0})
    daemon.wait_for("message.dead_lettered", message_id=mid, timeout=30)
    assert len(daemon.select("message.failed", message_id=mid)) == 2
    assert ledger.ids("start") == [mid] * 3
    [copy] = broker.pull_messages(dl_sub, timeout=10)
    assert copy.attributes["consumerd_attempt"] == "3" and copy.attributes["consumerd_outcome"] == "crash"


def test_delivery_attempt_from_a_subscription_dead_letter_policy(broker, topic_sub, make_daemon, dead_letter):
    dl_topic, _ = dead_letter
    topic, sub = topic_sub(dead_letter_policy={"dead_letter_topic": dl_topic, "max_delivery_attempts": 5})
    [mid] = broker.publish(topic, task="raise_once")
    daemon = make_daemon(sub, retry={"min_backoff": 0, "max_backoff": 0})
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    [done] = daemon.wait_for("message.done", message_id=mid)
    assert (failed["attempt"], done["attempt"]) == (1, 2)


def test_exactly_once_subscription_acks_for_real(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(enable_exactly_once_delivery=True)
    ids = broker.publish(topic, 50, task="ok")
    daemon = make_daemon(sub, workers={"concurrency": 4})
    [subscribed] = daemon.wait_for("pubsub.subscribed")
    assert subscribed["exactly_once"] is True
    daemon.wait_for_ids("message.done", set(ids), timeout=60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert not daemon.select("pubsub.ack_id_failed")
    assert sorted(ledger.ids("done")) == sorted(ids)
    assert broker.pull_ids(sub, timeout=12) == []


def test_exactly_once_ack_of_a_stale_ack_id_is_reported_per_ack_id(broker, topic_sub, emulator):
    topic, sub = topic_sub(enable_exactly_once_delivery=True)
    broker.publish(topic, 2, task="ok")
    adapter = PubSub(PubSubSettings(project=PROJECT, subscription=sub, emulator_host=emulator.host))
    received = []
    while len(received) < 2:
        received += adapter.pull(10, 5)
    first, second = (r.ack_id for r in received)
    assert adapter.ack([first]) == {}
    failures = adapter.ack([first, second])  # `first` is acked already: a permanent failure
    assert failures == {first: "PERMANENT_FAILURE_INVALID_ACK_ID"}
    adapter.close()


def test_ordering_key_runs_in_order_and_a_failure_holds_the_rest(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(enable_message_ordering=True)
    first = broker.publish(topic, ordering_key="K", task="raise_once")[0]
    rest = [broker.publish(topic, ordering_key="K", data={"seconds": 0.2}, task="sleep")[0] for _ in range(3)]
    other = broker.publish(topic, ordering_key="L", task="ok")[0]
    daemon = make_daemon(sub, workers={"concurrency": 4}, retry={"min_backoff": 1, "max_backoff": 1})
    daemon.wait_for_ids("message.done", {first, *rest, other}, timeout=60)
    keyed = [(e, mid) for e, mid, *_ in ledger.lines() if mid in {first, *rest}]
    # K's messages never overlap and finish in publish order, the failed first one included.
    assert [mid for e, mid in keyed if e == "done"] == [first, *rest]
    for before, after in zip([first, *rest], rest):
        assert keyed.index(("done", before)) < keyed.index(("start", after))


def test_byte_budget_limits_what_runs_at_once(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 4, data={"seconds": 0.3, "pad": "x" * 700}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 4}, flow={"max_inflight_bytes": 1000})
    daemon.wait_for_ids("message.done", set(ids), timeout=60)
    events = [e for e, *_ in ledger.lines()]
    assert events == ["start", "done"] * 4, f"more than one ~750-byte message ran at once: {events}"


def test_idempotency_key_from_a_configured_attribute(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    keyed = broker.publish(topic, task="key", order_id="A-17")[0]
    plain = broker.publish(topic, task="key")[0]
    daemon = make_daemon(sub, tasks={"idempotency_attribute": "order_id"})
    daemon.wait_for_ids("message.done", {keyed, plain})
    assert sorted(ledger.ids("key=A-17")) == [keyed]
    assert ledger.ids(f"key={plain}") == [plain]

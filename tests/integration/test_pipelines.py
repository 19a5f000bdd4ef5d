"""Tasks that publish their results, against the emulator: outputs exist for every acked input,
none for a failed task, the allow-list and the byte limit hold, and workers never touch Pub/Sub."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support.pubsub import unique

pytestmark = pytest.mark.integration
MODULES = {"modules": ["tests.support.publish_tasks", "tests.support.tasks"]}


def drain_outputs(broker, subscription: str, expected: int, timeout: float = 30) -> list:
    """Pull from ``subscription`` until ``expected`` messages came (or the time is up)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += broker.pull_messages(subscription, timeout=2)
    return got


def test_outputs_are_published_before_the_input_is_acked_with_their_source_id(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    out_topic, out_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [out_topic.rsplit("/", 1)[1]]})  # a short name
    daemon.wait_ready()
    ids = broker.publish(topic, 20, task="enrich", to=out_topic)
    daemon.wait_for_ids("message.done", set(ids))
    published = daemon.select("outputs.published")
    assert {e["message_id"] for e in published} == set(ids) and all(e["published"] == 2 for e in published)
    for mid in ids:  # the ack came after Pub/Sub accepted the outputs
        [done] = daemon.select("message.done", message_id=mid)
        [out] = daemon.select("outputs.published", message_id=mid)
        assert out["timestamp"] <= done["timestamp"]
    outputs = drain_outputs(broker, out_sub, 40)
    assert len(outputs) == 40
    sources = [m.attributes["consumerd_source_message_id"] for m in outputs]
    assert sorted(sources) == sorted(ids * 2)
    for message in outputs:
        body = json.loads(message.data)
        assert body["source"] == message.attributes["consumerd_source_message_id"] and message.attributes["stage"] == "enriched"
        assert message.ordering_key == body["source"]
    stopped = daemon.stop()
    assert stopped is not None and stopped["succeeded"] == 20 and stopped["failed"] == 0


def test_a_task_that_fails_after_publishing_publishes_nothing(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    out_topic, out_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [out_topic]})
    [mid] = broker.publish(topic, task="publish_then_fail", to=out_topic)
    failed = daemon.wait_for("message.failed", message_id=mid)[0]
    assert "failed after publishing" in failed["error"]
    assert not daemon.select("outputs.published")
    assert broker.pull_messages(out_sub, timeout=3) == []


def test_a_topic_outside_the_allow_list_fails_the_task_with_a_clear_error(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    allowed, _ = topic_sub()
    elsewhere, elsewhere_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [allowed]})
    [mid] = broker.publish(topic, task="enrich", to=elsewhere)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert failed["error"].startswith("PublishError:") and "is not in [publish] topics" in failed["error"]
    assert broker.pull_messages(elsewhere_sub, timeout=3) == []


def test_a_task_publishing_100_mb_fails_and_the_supervisor_does_not_grow(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    out_topic, out_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [out_topic]})
    daemon.wait_ready()
    before = daemon.sample_rss()
    [mid] = broker.publish(topic, task="publish_100mb", to=out_topic)
    [failed] = daemon.wait_for("message.failed", message_id=mid)
    assert "exceed 10485760 bytes ([publish] max_bytes)" in failed["error"]
    assert daemon.sample_rss() - before < 30  # MB: nothing of the 100 MB reached the supervisor
    assert broker.pull_messages(out_sub, timeout=3) == []


def test_a_publish_topic_that_does_not_exist_is_a_config_error_at_start(topic_sub, make_daemon):
    _, sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": ["no-such-topic"]})
    assert daemon.wait_exit() == 78
    [fatal] = daemon.select("daemon.config_error") or daemon.select("daemon.fatal")
    assert "publish.topics" in json.dumps(fatal) and "no-such-topic" in json.dumps(fatal)


def _tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_workers_that_publish_hold_no_network_socket(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    out_topic, out_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [out_topic]})
    daemon.wait_ready()
    ids = broker.publish(topic, 4, task="enrich", to=out_topic, seconds="2")
    daemon.wait_for("outputs.published", timeout=20)  # the workers have published (two tasks still run)
    workers = daemon.workers()
    assert workers
    tcp = _tcp_inodes()
    assert _socket_inodes(daemon.pid) & tcp  # the supervisor talks to the emulator over TCP...
    for pid in workers:
        assert not _socket_inodes(pid) & tcp, f"worker {pid} holds a TCP socket"  # ...its workers never do
    daemon.wait_for_ids("message.done", set(ids))
    assert len(drain_outputs(broker, out_sub, 8)) == 8


def test_the_supervisor_killed_mid_run_leaves_every_input_acked_and_every_output_published(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub(ack_deadline=10)
    out_topic, out_sub = topic_sub()
    publish = {"topics": [out_topic]}
    ids = broker.publish(topic, 30, task="enrich", to=out_topic, seconds="0.2")
    first = make_daemon(sub, tasks=MODULES, publish=publish)
    first.wait_for("outputs.published", count=6, timeout=60)
    first.kill()  # SIGKILL: no drain, no flush
    second = make_daemon(sub, tasks=MODULES, publish=publish, workers={"concurrency": 2})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not unique(ledger.ids("done")) >= set(ids):
        time.sleep(0.5)
    second.wait_for_ids("message.done", set(ids) - {e["message_id"] for e in first.select("message.done")}, timeout=60)
    stopped = second.stop()
    assert stopped is not None
    assert broker.pull_ids(sub, timeout=3) == []  # every input acked: nothing comes back
    outputs = drain_outputs(broker, out_sub, 60, timeout=40)
    outputs += broker.pull_messages(out_sub, timeout=3)
    by_source: dict[str, set[int]] = {}
    for message in outputs:
        by_source.setdefault(message.attributes["consumerd_source_message_id"], set()).add(json.loads(message.data)["part"])
    assert {mid: by_source.get(mid) for mid in ids} == {mid: {1, 2} for mid in ids}  # at least once, each


def test_an_exactly_once_input_is_acked_once_after_its_outputs(broker, topic_sub, make_daemon):
    topic, sub = topic_sub(enable_exactly_once_delivery=True)
    out_topic, out_sub = topic_sub()
    daemon = make_daemon(sub, tasks=MODULES, publish={"topics": [out_topic]})
    assert daemon.wait_for("pubsub.subscribed")[0]["exactly_once"] is True
    ids = broker.publish(topic, 5, task="enrich", to=out_topic)
    daemon.wait_for_ids("message.done", set(ids))
    stopped = daemon.stop()
    assert stopped is not None and stopped["succeeded"] == 5
    assert not daemon.select("pubsub.ack_id_failed") and not daemon.select("pubsub.ack_failed")
    assert broker.pull_ids(sub, timeout=3) == []
    assert len(drain_outputs(broker, out_sub, 10)) == 10

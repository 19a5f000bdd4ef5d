"""`consumerd.testing.run_task` says what the daemon does: each case run by `run_task` (in this
process and in a forked worker) and by the real daemon against the emulator, the outcomes compared.

The daemon's side is read from its own evidence (its log events, the dead-letter copy's attributes),
not from the plugin's mapping, so the two sides are independent.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any

import pytest

from consumerd.testing import TaskOutcome, make_message, run_task

pytestmark = pytest.mark.integration

MODULE = "tests.support.parity_tasks"  # imported by `by_run_task`, after other tests may have cleared the registry
OUTPUTS = "projects/test-project/topics/parity-outputs"  # where parity_publish publishes
Case = list[tuple[bytes, dict[str, str]]]  # the messages of one call: data and attributes

CASES: dict[str, tuple[str, Case]] = {
    "ack": ("parity_ok", [(b'{"order": 1}', {})]),
    "retry with a delay": ("parity_retry", [(b"", {"after": "30"})]),
    "reject": ("parity_reject", [(b"", {})]),
    "payload error": ("parity_parse", [(b"not json", {})]),
    "failure": ("parity_boom", [(b"", {})]),
    "failure on the last attempt": ("parity_last_attempt", [(b"", {})]),
    "timeout": ("parity_slow", [(b"", {})]),
    "batch partial failure": ("parity_rows", [(b"", {}), (b"", {"fail": "retry"}), (b"", {"fail": "reject"}), (b"", {"fail": "error"})]),
    "async ack": ("parity_aio_ok", [(b"[1, 2]", {})]),
    "async failure": ("parity_aio_boom", [(b"", {})]),
    "async timeout": ("parity_aio_hang", [(b"", {})]),
    "publishes": ("parity_publish", [(b"", {})]),
}


def plain(outcome: TaskOutcome) -> dict[str, Any]:
    """What is compared: everything but the message id (which each output names as its source)."""
    fields = dataclasses.asdict(outcome)
    for output in fields["published"]:
        assert output["attributes"].pop("consumerd_source_message_id") == outcome.message_id
    del fields["message_id"]
    return fields


def by_run_task(name: str, case: Case, isolated: bool) -> list[dict[str, Any]]:
    importlib.import_module(MODULE)
    messages = [make_message(data, attrs) for data, attrs in case]
    got = run_task(name, messages if len(messages) > 1 else messages[0], isolated=isolated)
    return [plain(o) for o in (got if isinstance(got, list) else [got])]


def by_the_daemon(broker, topic_sub, make_daemon, name: str, case: Case) -> list[dict[str, Any]]:
    topic, sub = topic_sub()
    dl_topic, dl_sub = topic_sub()
    ids = [broker.publish(topic, data=data, task=name, **attrs)[0] for data, attrs in case]
    out_sub = f"{dl_sub}-outputs"
    broker.adapter.ensure_topic(OUTPUTS)
    broker.adapter.ensure_subscription(OUTPUTS, out_sub, 10)
    daemon = make_daemon(sub, tasks={"modules": [MODULE]}, dead_letter={"topic": dl_topic}, publish={"topics": [OUTPUTS]})
    settled = {mid: first_settling(daemon, mid) for mid in ids}
    outputs: dict[str, list[dict[str, Any]]] = {}
    if name == "parity_publish":
        for message in sorted(broker.pull_messages(out_sub, timeout=10), key=lambda m: m.attributes["n"]):  # in the order published
            attributes = dict(message.attributes)
            source = attributes.pop("consumerd_source_message_id")
            outputs.setdefault(source, []).append(
                {"topic": OUTPUTS, "data": message.data, "attributes": attributes, "ordering_key": message.ordering_key}
            )
    broker.adapter.subscriber.delete_subscription(request={"subscription": out_sub})
    copies: dict[str, dict[str, str]] = {}
    if any(e["event"] == "message.dead_lettered" for e in settled.values()):
        for message in broker.pull_messages(dl_sub, timeout=10):
            copies[message.attributes["consumerd_original_message_id"]] = dict(message.attributes)
    return [observed(settled[mid], copies.get(mid), outputs.get(mid, [])) for mid in ids]


def first_settling(daemon, mid: str, timeout: float = 30) -> dict[str, Any]:
    """The event that settled the first attempt at ``mid``: done, failed (given back) or dead-lettered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("message.done", "message.failed", "message.dead_lettered"):
            if found := daemon.select(name, message_id=mid, attempt=1):
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"message {mid} was not settled within {timeout}s; last lines:\n{''.join(daemon.raw[-15:])}")


def observed(event: dict[str, Any], copy: dict[str, str] | None, published: list[dict[str, Any]]) -> dict[str, Any]:
    blank = plain(TaskOutcome("", ""))
    if event["event"] == "message.done":
        return {**blank, "outcome": "success", "acked": True, "published": published}
    if event["event"] == "message.dead_lettered":
        assert copy is not None, "dead-lettered, but no copy reached the dead-letter topic"
        return {**blank, "outcome": copy["consumerd_outcome"], "rejected": copy["consumerd_error"]}
    if event["outcome"] == "retry":
        return {**blank, "outcome": "retry", "retry_after": float(event["retry_in_s"])}
    return {**blank, "outcome": event["outcome"], "failed": event["error"]}


@pytest.mark.parametrize("case", list(CASES))
def test_run_task_says_what_the_daemon_does(case, broker, topic_sub, make_daemon):
    name, messages = CASES[case]
    daemon_side = by_the_daemon(broker, topic_sub, make_daemon, name, messages)
    assert by_run_task(name, messages, isolated=False) == daemon_side
    assert by_run_task(name, messages, isolated=True) == daemon_side

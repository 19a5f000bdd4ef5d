"""Test-side Pub/Sub helpers on the real emulator: topics, subscriptions, publishing, checking."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc

from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.testing.live import to_toml
from harness.daemon import PROJECT

_names = itertools.count(1)


class Broker:
    """One emulator seen from a test: creates uniquely named topics and subscriptions."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=host))
        self.publisher = self.adapter.batch_publisher()
        self.ordered_publisher = self.adapter.batch_publisher(ordered=True)

    def create(self, ack_deadline: int = 10, **subscription: Any) -> tuple[str, str]:
        n = next(_names)
        topic = f"projects/{PROJECT}/topics/topic-{n}"
        sub = f"projects/{PROJECT}/subscriptions/sub-{n}"
        self.adapter.ensure_topic(topic)
        request = {"name": sub, "topic": topic, "ack_deadline_seconds": ack_deadline, **subscription}
        self.adapter.subscriber.create_subscription(request=request)
        return topic, sub

    def publish(self, topic: str, count: int = 1, data: bytes | dict = b"", ordering_key: str = "", **attributes: str) -> list[str]:
        payload = json.dumps(data).encode() if isinstance(data, dict) else data
        publisher = self.ordered_publisher if ordering_key else self.publisher
        extra = {"ordering_key": ordering_key} if ordering_key else {}
        futures = [publisher.publish(topic, payload, **extra, **attributes) for _ in range(count)]
        return [f.result(timeout=30) for f in futures]

    def pull_messages(self, subscription: str, timeout: float, ack: bool = True) -> list:
        """Pull what is there within ``timeout`` (acking it) and return the messages."""
        try:
            response = self.adapter.subscriber.pull(
                request={"subscription": subscription, "max_messages": 100}, timeout=timeout, retry=None
            )
        except gexc.DeadlineExceeded:
            return []
        if ack and response.received_messages:
            self.adapter.subscriber.acknowledge(
                request={"subscription": subscription, "ack_ids": [m.ack_id for m in response.received_messages]}
            )
        return [m.message for m in response.received_messages]

    def pull_ids(self, subscription: str, timeout: float) -> list[str]:
        """Message ids a fresh pull gets within ``timeout`` (the emulator long-polls); nacked back at once."""
        try:
            response = self.adapter.subscriber.pull(
                request={"subscription": subscription, "max_messages": 100}, timeout=timeout, retry=None
            )
        except gexc.DeadlineExceeded:
            return []
        ack_ids = [m.ack_id for m in response.received_messages]
        if ack_ids:
            self.adapter.subscriber.modify_ack_deadline(
                request={"subscription": subscription, "ack_ids": ack_ids, "ack_deadline_seconds": 0}
            )
        return [m.message.message_id for m in response.received_messages]

    def delete(self, topic: str, subscription: str) -> None:
        # The emulator never frees acked messages until their topic and subscription go.
        for call in (
            lambda: self.adapter.subscriber.delete_subscription(request={"subscription": subscription}),
            lambda: self.adapter.publisher.delete_topic(request={"topic": topic}),
        ):
            try:
                call()
            except gexc.NotFound:
                pass

    def close(self) -> None:
        self.publisher.stop()
        self.ordered_publisher.stop()
        self.adapter.close()


class Ledger:
    """What the test tasks recorded: `event message_id attempt pid` lines."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ledger.txt"

    def lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.path.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def ids(self, event: str) -> list[str]:
        return [parts[1] for parts in self.lines() if parts[0] == event]


def toml(data: dict[str, dict[str, Any]]) -> str:
    """A config file's text: the one writer the pytest plugin ships serves the project's tests too."""
    return to_toml(data)


def unique(ids: Iterable[str]) -> set[str]:
    return set(ids)

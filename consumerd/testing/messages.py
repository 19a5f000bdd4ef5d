"""Messages for tests: the same `Message` record the supervisor builds from a pulled message."""

from __future__ import annotations

import datetime
import itertools
import json
from collections.abc import Mapping
from typing import Any

from consumerd.message import Message

DEFAULT_SUBSCRIPTION = "projects/test-project/subscriptions/test"
_ids = itertools.count(1)


def make_message(
    data: Any = b"",
    attributes: Mapping[str, str] | None = None,
    ordering_key: str = "",
    delivery_attempt: int | None = None,
    message_id: str | None = None,
    subscription: str = DEFAULT_SUBSCRIPTION,
    publish_time: datetime.datetime | None = None,
    idempotency_attribute: str = "",
) -> Message:
    """A `Message` as a task receives it.

    ``data`` is bytes (as is), text (UTF-8), a pydantic model (its JSON) or anything else JSON can
    encode (a dict, a list). Attribute keys and values must be text, as Pub/Sub requires; each call
    gets a fresh message id unless ``message_id`` is given.
    """
    for key, value in (attributes or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise TypeError(f"attribute {key!r}: Pub/Sub attributes are text, got {type(value).__name__}")
    return Message(
        message_id=message_id if message_id is not None else f"test-{next(_ids)}",
        data=payload_bytes(data),
        attributes=dict(attributes or {}),
        publish_time=publish_time or datetime.datetime.now(datetime.UTC),
        delivery_attempt=delivery_attempt,
        ordering_key=ordering_key,
        subscription=subscription,
        key_attribute=idempotency_attribute,
    )


def payload_bytes(data: Any) -> bytes:
    """What a publisher would put on the wire for ``data``."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    dump = getattr(data, "model_dump_json", None)  # a pydantic model, without importing pydantic here
    if callable(dump):
        return str(dump()).encode()
    return json.dumps(data, separators=(",", ":")).encode()

"""The immutable message a task receives: plain data only, so it pickles cheaply to a worker."""

from __future__ import annotations

import dataclasses
import datetime
import json
import types
from collections.abc import Mapping
from typing import Any

from consumerd.errors import PayloadError


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One Pub/Sub message as a task sees it.

    ``delivery_attempt`` is None when the subscription has no dead-letter policy (Pub/Sub only
    counts attempts then). ``attributes`` is a read-only mapping.
    """

    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: datetime.datetime | None
    delivery_attempt: int | None
    ordering_key: str
    subscription: str
    key_attribute: str = ""  # [tasks] idempotency_attribute

    @property
    def idempotency_key(self) -> str:
        """A stable key to de-duplicate on: the configured attribute if present, else the message id.

        Delivery is at least once, so a task may see the same message again; this key is the same
        on every delivery (and, with an attribute the publisher sets, across republished copies).
        """
        if self.key_attribute and self.attributes.get(self.key_attribute):
            return self.attributes[self.key_attribute]
        return self.message_id

    def __post_init__(self) -> None:
        if not isinstance(self.attributes, types.MappingProxyType):
            frozen = types.MappingProxyType(dict(self.attributes))
            object.__setattr__(self, "attributes", frozen)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # MappingProxyType does not pickle: send a plain dict and re-freeze on the other side. A UTC
        # publish time goes without its tzinfo: pickling timezone.utc takes copyreg's slow path, a
        # large share of what each job costs the supervisor's loop.
        when, utc = self.publish_time, False
        if when is not None and when.tzinfo is datetime.UTC:
            when, utc = when.replace(tzinfo=None), True
        fields = (self.message_id, self.data, dict(self.attributes), when, self.delivery_attempt, self.ordering_key, self.subscription)
        return (_unpickle, (fields, self.key_attribute, utc))

    @property
    def size(self) -> int:
        """Payload size in bytes: what logs show instead of the payload."""
        return len(self.data)

    def text(self, encoding: str = "utf-8") -> str:
        """The payload decoded as text; raises PayloadError (a Reject) for bytes that are not."""
        try:
            return self.data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload is not {encoding} text: {exc.reason} at byte {exc.start}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; raises PayloadError (a Reject and a ValueError) if it is not."""
        try:
            return json.loads(self.text())
        except json.JSONDecodeError as exc:
            raise PayloadError(f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _unpickle(fields: tuple[Any, ...], key_attribute: str, utc: bool) -> Message:
    message_id, data, attributes, when, delivery_attempt, ordering_key, subscription = fields
    if utc:
        when = when.replace(tzinfo=datetime.UTC)
    return Message(message_id, data, attributes, when, delivery_attempt, ordering_key, subscription, key_attribute)

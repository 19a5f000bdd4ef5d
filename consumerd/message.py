"""The immutable message a task receives: plain data only, so it pickles cheaply to a worker."""

from __future__ import annotations

import dataclasses
import datetime
import json
import types
from collections.abc import Mapping
from typing import Any


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

    def __post_init__(self) -> None:
        if not isinstance(self.attributes, types.MappingProxyType):
            frozen = types.MappingProxyType(dict(self.attributes))
            object.__setattr__(self, "attributes", frozen)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # MappingProxyType does not pickle; send a plain dict and re-freeze on the other side.
        return (
            Message,
            (
                self.message_id,
                self.data,
                dict(self.attributes),
                self.publish_time,
                self.delivery_attempt,
                self.ordering_key,
                self.subscription,
            ),
        )

    @property
    def size(self) -> int:
        """Payload size in bytes: what logs show instead of the payload."""
        return len(self.data)

    def text(self, encoding: str = "utf-8") -> str:
        """The payload decoded as text; raises UnicodeDecodeError for bytes that are not."""
        return self.data.decode(encoding)

    def json(self) -> Any:
        """The payload parsed as JSON (UTF-8); raises ValueError for anything else."""
        return json.loads(self.text())

"""A message the supervisor holds a lease on: what the intake, the backlog, the pool and the settler
pass between them from the pull until the message is acked or given back."""

from __future__ import annotations

import dataclasses

from consumerd.message import Message


@dataclasses.dataclass(slots=True, eq=False)
class InFlight:
    """A pulled message the supervisor holds a lease on, until it is acked or given back."""

    ack_id: str
    message: Message
    task: str
    attempt: int
    received_at: float
    worker_pid: int | None = None
    size: int = dataclasses.field(init=False)  # bytes held: payload, attributes and ordering key

    def __post_init__(self) -> None:
        self.size = message_bytes(self.message)

    @property
    def key(self) -> str:
        return self.message.ordering_key


def message_bytes(message: Message) -> int:
    """What a message weighs in the byte budget: attributes count, so empty messages are not free."""
    attributes = sum(len(k.encode()) + len(v.encode()) for k, v in message.attributes.items())
    return len(message.data) + attributes + len(message.ordering_key.encode())

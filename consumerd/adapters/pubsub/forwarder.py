"""A thread that publishes copies of poison messages to the dead-letter topic.

The supervisor hands over a `DeadLetter`; once the copy is published the thread posts
`Forwarded(ok=True)` to the supervisor's inbox and only then does the supervisor ack the original.
Transient failures are retried with backoff while the supervisor keeps the original's lease alive;
a permanent failure (the topic was deleted, permission revoked) is posted as `ok=False` and the
original is given back instead: never acked without a copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from consumerd.adapters.pubsub.handoff import Handoff
from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff

MAX_TRIES = 8


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    ack_id: str
    data: bytes
    attributes: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Forwarded:
    ack_id: str
    ok: bool
    detail: str  # the new message id, or the error
    permanent: bool = False  # a failure retrying cannot fix (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED)


class Forwarder(Handoff[DeadLetter]):
    def __init__(
        self,
        publish: Callable[[bytes, Mapping[str, str]], str],
        inbox: Inbox,
        is_transient: Callable[[BaseException], bool],
        backoff: Backoff = Backoff(base=0.5, cap=10.0),
        labels: Mapping[str, str] | None = None,  # on every log line: the subscription it serves
    ) -> None:
        super().__init__("forwarder", inbox, labels)
        self._publish = publish
        self._is_transient = is_transient
        self._backoff = backoff

    def forward(self, letter: DeadLetter) -> None:
        self.put(letter)

    def handle(self, letter: DeadLetter) -> Forwarded:
        return self._forward(letter)

    def _forward(self, letter: DeadLetter) -> Forwarded:
        for attempt in range(1, MAX_TRIES + 1):
            try:
                return Forwarded(letter.ack_id, True, self._publish(letter.data, letter.attributes))
            except Exception as exc:  # noqa: BLE001 - classified: retried or reported
                detail = f"{type(exc).__name__}: {exc}"[:300]
                if not self._is_transient(exc):
                    return Forwarded(letter.ack_id, False, detail, permanent=True)
                if attempt == MAX_TRIES or self._stopping.is_set():
                    return Forwarded(letter.ack_id, False, detail)
                self.log.warning("dead_letter.retry", error=detail, attempt=attempt)
                self._stopping.wait(self._backoff.delay(attempt))
        return Forwarded(letter.ack_id, False, "gave up")

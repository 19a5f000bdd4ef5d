"""A thread that publishes the outputs of succeeded tasks, with the supervisor's own credentials.

The supervisor hands over an `OutputBatch` (every output of one task call); once Pub/Sub accepted all
of them the thread posts `OutputsPublished(ok=True)` to the supervisor's inbox, and only then does
the supervisor ack the input. Requests go per topic, at most 1,000 messages and ~9 MB each (the
service's limits on one Publish call); a request that failed transiently is retried with backoff
while the input's lease is kept alive, and the ones already accepted are not sent again. Giving up
(a permanent error, or MAX_TRIES) posts ``ok=False``: the input is retried later, and its outputs
are published again then: at least once per output, never zero times for an acked input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from consumerd.adapters.pubsub.handoff import Handoff
from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff

MAX_TRIES = 8
MAX_REQUEST_MESSAGES = 1000
MAX_REQUEST_BYTES = 9_000_000  # under the 10 MB request limit, leaving room for the request's own fields

Message = tuple[bytes, Mapping[str, str], str]  # data, attributes, ordering key


@dataclasses.dataclass(frozen=True)
class OutputBatch:
    ack_id: str  # the input whose ack waits for these
    outputs: Sequence[tuple[str, bytes, Mapping[str, str], str]]  # topic, data, attributes, ordering key


@dataclasses.dataclass(frozen=True)
class OutputsPublished:
    ack_id: str
    ok: bool
    detail: str = ""  # the error when not ok
    published: int = 0  # outputs Pub/Sub accepted (all of them when ok)


class OutputPublisher(Handoff[OutputBatch]):
    def __init__(
        self,
        publish: Callable[[str, Sequence[Message]], list[str]],
        inbox: Inbox,
        is_transient: Callable[[BaseException], bool],
        backoff: Backoff = Backoff(base=0.2, cap=5.0),
        labels: Mapping[str, str] | None = None,  # on every log line: the subscription it serves
    ) -> None:
        super().__init__("publisher", inbox, labels)
        self._publish = publish
        self._is_transient = is_transient
        self._backoff = backoff

    def send(self, batch: OutputBatch) -> None:
        self.put(batch)

    def handle(self, batch: OutputBatch) -> OutputsPublished:
        return self._deliver(batch)

    def _deliver(self, batch: OutputBatch) -> OutputsPublished:
        published = 0
        for topic, messages in requests(batch.outputs):
            error = self._request(topic, messages)
            if error:
                return OutputsPublished(batch.ack_id, False, error, published)
            published += len(messages)
        return OutputsPublished(batch.ack_id, True, published=published)

    def _request(self, topic: str, messages: list[Message]) -> str:
        """Publish one request, retrying transient errors; "" once accepted, else the error."""
        for attempt in range(1, MAX_TRIES + 1):
            try:
                self._publish(topic, messages)
                return ""
            except Exception as exc:  # noqa: BLE001 - classified: retried or reported
                detail = f"{topic}: {type(exc).__name__}: {exc}"[:300]
                if not self._is_transient(exc) or attempt == MAX_TRIES or self._stopping.is_set():
                    return detail
                self.log.warning("outputs.publish_retry", error=detail, attempt=attempt)
                self._stopping.wait(self._backoff.delay(attempt))
        return "gave up"


def requests(outputs: Sequence[tuple[str, bytes, Mapping[str, str], str]]) -> list[tuple[str, list[Message]]]:
    """The outputs as Publish requests: by topic, in the order published, within the request limits."""
    by_topic: dict[str, list[list[Message]]] = {}
    sizes: dict[str, int] = {}
    for topic, data, attributes, key in outputs:
        size = len(data) + sum(len(k) + len(v) for k, v in attributes.items()) + len(key)
        chunks = by_topic.setdefault(topic, [[]])
        if chunks[-1] and (len(chunks[-1]) >= MAX_REQUEST_MESSAGES or sizes[topic] + size > MAX_REQUEST_BYTES):
            chunks.append([])
            sizes[topic] = 0
        chunks[-1].append((data, attributes, key))
        sizes[topic] = sizes.get(topic, 0) + size
    return [(topic, chunk) for topic, chunks in by_topic.items() for chunk in chunks]

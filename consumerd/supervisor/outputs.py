"""The outputs of succeeded tasks on their way to Pub/Sub, and the inputs whose ack waits for them.

A task's outputs (`consumerd.publish`) arrive with its success result. Each is checked against
`[publish]` again here (the worker checked them, but the supervisor trusts nothing a worker sends),
stamped with ``consumerd_source_message_id`` (the input's id: a downstream task deduplicates on
it, since a crash before the ack publishes them again), weighed in the byte budget, and handed to
the publisher thread. The input keeps its lease meanwhile; the `Settler` acks it when the thread
reports every output accepted, and retries it when the thread gave up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from consumerd.adapters.pubsub.publisher import OutputBatch, OutputsPublished
from consumerd.ipc.held import InFlight
from consumerd.ipc.outputs import SOURCE_ATTRIBUTE, PublishRules
from consumerd.ipc.records import Result
from consumerd.policy.backlog import Backlog


@dataclasses.dataclass(frozen=True)
class Publishing:
    inflight: InFlight
    result: Result
    size: int  # bytes counted in the budget until the outputs are settled


class OutputRelay:
    def __init__(self, send: Callable[[OutputBatch], None] | None, rules: PublishRules, backlog: Backlog) -> None:
        self._send = send
        self._rules = rules
        self._backlog = backlog
        self._waiting: dict[str, Publishing] = {}  # by the input's ack id

    def __len__(self) -> int:
        return len(self._waiting)

    def relay(self, inflight: InFlight, result: Result) -> str:
        """Hand the outputs to the publisher; "" when they went, else why the task failed instead."""
        for output in result.outputs:
            if refusal := self._rules.refusal(output.topic):
                return f"PublishError: {refusal}"
        if self._send is None:
            return "PublishError: publishing is off: no [publish] topics are configured"
        source = inflight.message.message_id
        outputs = [(o.topic, o.data, {**o.attributes, SOURCE_ATTRIBUTE: source}, o.ordering_key) for o in result.outputs]
        size = sum(o.size for o in result.outputs)
        self._waiting[inflight.ack_id] = Publishing(inflight, result, size)
        self._backlog.publishing(size)
        self._send(OutputBatch(inflight.ack_id, outputs))
        return ""

    def settled(self, report: OutputsPublished) -> Publishing | None:
        """The publisher's report: the input it was for (None: no longer held here)."""
        entry = self._waiting.pop(report.ack_id, None)
        if entry is not None:
            self._backlog.published(entry.size)
        return entry

    def drop(self, ack_id: str) -> None:
        if (entry := self._waiting.pop(ack_id, None)) is not None:
            self._backlog.published(entry.size)

    def take_all(self) -> list[InFlight]:
        """At shutdown: the inputs still waiting, no longer tracked (given back: their outputs may
        be published twice, never lost)."""
        taken = [entry.inflight for entry in self._waiting.values()]
        for ack_id in list(self._waiting):
            self.drop(ack_id)
        return taken

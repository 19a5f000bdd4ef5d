"""What the daemon would do with a message, given how its task ended: the delivery policy's answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from consumerd.ipc.outputs import SOURCE_ATTRIBUTE
from consumerd.ipc.records import Outcome, Result, TaskOptions
from consumerd.policy.delivery import Action, RetryPolicy, decide


@dataclasses.dataclass(frozen=True)
class Published:
    """A message a task published (`consumerd.publish`), as the daemon would publish it once the
    task succeeded: ``topic`` as the task named it (resolved where a project is known), the data
    encoded, and the attributes with ``consumerd_source_message_id`` added."""

    topic: str
    data: bytes
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ordering_key: str = ""


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One message's fate. Exactly one of these holds: ``acked``; ``retry_after`` (the delay a
    `Retry` asked for, as the daemon applies it); ``rejected`` (the error text its dead-letter copy
    carries in ``consumerd_error``); ``failed`` (an ordinary failure or a timeout, retried with
    backoff: the error text the daemon logs)."""

    message_id: str
    outcome: str  # how the attempt ended, as `message.failed` logs it: success, error, retry, reject, timeout, crash
    acked: bool = False
    retry_after: float | None = None
    rejected: str | None = None
    failed: str | None = None
    published: list[Published] = dataclasses.field(default_factory=list)


def outcome_of(message_id: str, result: Result, attempt: int, options: TaskOptions) -> TaskOutcome:
    """Ask the daemon's own policy, as if a dead-letter topic were set (a reject is dead-lettered)."""
    decision = decide(
        result.outcome,
        attempt,
        RetryPolicy(),  # only the delay of an ordinary failure depends on it, and that is not reported
        dead_letter=True,
        max_attempts=options.max_attempts or 0,
        retry_after=result.retry_after,
    )
    how, error = result.outcome.value, result.error or result.outcome.value
    if decision.action is Action.ACK:
        published = [Published(o.topic, o.data, {**o.attributes, SOURCE_ATTRIBUTE: message_id}, o.ordering_key) for o in result.outputs]
        return TaskOutcome(message_id, how, acked=True, published=published)
    if decision.action is Action.DEAD_LETTER:
        return TaskOutcome(message_id, how, rejected=error)
    if result.outcome is Outcome.RETRY and result.retry_after is not None:
        return TaskOutcome(message_id, how, retry_after=float(decision.delay))
    return TaskOutcome(message_id, how, failed=error)

"""What a batch task's return value means for each of its messages (pure: no I/O, no clock).

A batch task gets ``list[Message]`` (and, typed, ``list[X]`` of their payloads: a message whose
payload does not validate is rejected alone and left out of the call). Returning None acks them all; raising fails them all alike.
To fail only some, return a `BatchResult` (or a plain mapping of message id -> exception): each
listed message is handled as if its own task had raised that exception (`Retry(after=...)` retries
it after that delay, `Reject` dead-letters it, anything else is an ordinary failure); the others
are acked. What a task returns is checked like anything else that comes from task code: an id that
is not in the batch, or a value that is not an exception, is a clear error, never a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.errors import PayloadError, Reject, Retry
from consumerd.ipc.records import MAX_ERROR_CHARS, BatchJob, Outcome, Result
from consumerd.message import Message
from consumerd.policy.delivery import valid_retry_after
from consumerd.worker.payloads import Signature


class BatchResult:
    """The messages of a batch that did not succeed, by message id; the rest are acked."""

    def __init__(self, failures: Mapping[str, BaseException] | None = None) -> None:
        self.failures: dict[str, BaseException] = dict(failures or {})

    def retry(self, message: Message, after: float, reason: str = "") -> None:
        """Run this message again after ``after`` seconds (like raising `Retry` for it alone)."""
        self.failures[message.message_id] = Retry(after, reason)

    def reject(self, message: Message, reason: str) -> None:
        """Never retry this message: dead-letter it (like raising `Reject` for it alone)."""
        self.failures[message.message_id] = Reject(reason)

    def fail(self, message: Message, error: BaseException) -> None:
        """An ordinary failure of this message: retried with backoff."""
        self.failures[message.message_id] = error


@dataclasses.dataclass(frozen=True)
class Fate:
    outcome: Outcome
    error: str = ""
    retry_after: float | None = None


def fate_of(exc: BaseException) -> Fate:
    """What one exception means for its message (the same rules as for a single-message task)."""
    if isinstance(exc, Retry):
        after = getattr(exc, "after", None)  # a subclass may not have called Retry.__init__
        if valid_retry_after(after):
            return Fate(Outcome.RETRY, describe(exc, with_type=False), float(after))  # type: ignore[arg-type]
        return Fate(Outcome.ERROR, f"Retry(after={after!r}): the delay must be a finite number >= 0"[:MAX_ERROR_CHARS])
    if isinstance(exc, Reject):
        return Fate(Outcome.REJECT, describe(exc))
    return Fate(Outcome.ERROR, describe(exc))


def fates(returned: Any, messages: list[Message]) -> tuple[list[Fate], list[str]]:
    """One fate per message, in order, and the problems found in ``returned`` (for a warning)."""
    if returned is None:
        return [Fate(Outcome.SUCCESS)] * len(messages), []
    failures = returned.failures if isinstance(returned, BatchResult) else returned
    if not isinstance(failures, Mapping):
        error = f"a batch task must return None, a BatchResult or a mapping of message id -> exception, not {type(returned).__name__}"
        return [Fate(Outcome.ERROR, error)] * len(messages), [error]
    ids = {m.message_id for m in messages}
    problems = [f"message id {str(k)[:100]!r} is not in this batch" for k in failures if k not in ids]
    out = []
    for message in messages:
        exc = failures.get(message.message_id)
        if exc is None:
            out.append(Fate(Outcome.SUCCESS))
        elif isinstance(exc, BaseException):
            out.append(fate_of(exc))
        else:
            error = f"the batch result for this message must be an exception, not {type(exc).__name__}"
            problems.append(error)
            out.append(Fate(Outcome.ERROR, error))
    return out, problems


def batch_results(batch: BatchJob, returned: Any, duration: float, log: BoundLogger) -> list[Result]:
    """The results of a batch call that returned ``returned``: one per message, in order."""
    outcomes, problems = fates(returned, [j.message for j in batch.jobs])
    for problem in problems[:10]:
        log.warning("task.bad_batch_result", task=batch.task, error=problem)
    return [Result(j.seq, f.outcome, duration, f.error, f.retry_after) for j, f in zip(batch.jobs, outcomes, strict=True)]


def validate_batch(batch: BatchJob, signature: Signature) -> tuple[BatchJob | None, list[Any], dict[int, PayloadError]]:
    """The members whose payload validates (None: no member does), their values, the rest by seq."""
    if not signature.typed:
        return batch, [], {}
    members, values, rejected = [], [], {}
    for job in batch.jobs:
        try:
            values.append(signature.validate(job.message))
        except PayloadError as exc:
            rejected[job.seq] = exc
            continue
        members.append(job)
    return (dataclasses.replace(batch, jobs=tuple(members)) if members else None), values, rejected


def merged(batch: BatchJob, rejected: Mapping[int, PayloadError], results: list[Result]) -> list[Result]:
    """The members' ``results`` and a reject for each member left out, in the batch's order."""
    by_seq = {r.seq: r for r in results}
    return [by_seq.get(j.seq) or Result(j.seq, Outcome.REJECT, 0.0, describe(rejected[j.seq])) for j in batch.jobs]


def failure_in(returned: Any, message: Message) -> BaseException | None:
    """The exception a batch's return value names for ``message`` (None if it names none)."""
    failures = returned.failures if isinstance(returned, BatchResult) else returned
    exc = failures.get(message.message_id) if isinstance(failures, Mapping) else None
    return exc if isinstance(exc, BaseException) else None


def describe(exc: BaseException, *, with_type: bool = True) -> str:
    """``Type: text`` cut to MAX_ERROR_CHARS; never fails, whatever the exception's __str__ does."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a task's exception may break even its own __str__
        text = "<unprintable>"
    if with_type:
        text = f"{type(exc).__name__}: {text}"
    return text[:MAX_ERROR_CHARS]

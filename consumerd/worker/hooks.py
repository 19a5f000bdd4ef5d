"""Task hooks: `@on_task_failure` and `@on_task_success`, run in the worker once per message's outcome.

A hook is for reporting (an error tracker, a metric); it never changes a message's fate: one that
raises is logged as `hook.failed` and the result goes to the supervisor as it was. Hooks run after
the task, before its result is sent, so they count toward the task's timeout.

The worker knows the exception and the attempt, not every setting the supervisor applies, so
`TaskFailure.fate` is what the worker can tell: "dead_letter" for a reject (`Reject`, an invalid
payload), or an ordinary failure at the task's own `@task(max_attempts=...)`; "retry" otherwise.
A global `dead_letter.max_attempts` is the supervisor's alone, and without a dead-letter topic a
reject is held rather than dead-lettered: the supervisor's `message.failed` / `message.dead_lettered`
are the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from structlog.stdlib import BoundLogger

from consumerd.errors import PayloadError, TaskCancelled
from consumerd.ipc.records import BatchJob, Job, Outcome, Result
from consumerd.message import Message
from consumerd.worker.batch import describe, failure_in

Fate = Literal["retry", "dead_letter"]


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    """What an `@on_task_failure` hook receives: one message's failed attempt."""

    task: str
    message: Message
    exception: BaseException
    attempt: int  # 1 on the first delivery (Pub/Sub's count with a dead-letter policy, else the daemon's)
    fate: Fate  # what the worker can tell will happen next (see the module's docstring)
    duration: float  # seconds the task ran


@dataclasses.dataclass(frozen=True)
class TaskSuccess:
    """What an `@on_task_success` hook receives: one message done (a batch task: its return value)."""

    task: str
    message: Message
    result: object
    attempt: int
    duration: float


FailureHook = Callable[[TaskFailure], object]
SuccessHook = Callable[[TaskSuccess], object]


def fate_of_failure(outcome: Outcome, attempt: int, max_attempts: int | None) -> Fate:
    if outcome is Outcome.REJECT:
        return "dead_letter"
    if outcome is Outcome.RETRY:
        return "retry"
    return "dead_letter" if max_attempts is not None and attempt >= max_attempts else "retry"


def report(
    result: Result,
    job: Job,
    exc: BaseException | None,
    returned: object,
    hooks: tuple[Sequence[SuccessHook], Sequence[FailureHook]],
    max_attempts: int | None,
    log: BoundLogger,
) -> None:
    """Run the hooks for one message's ``result``: success hooks, or failure hooks with ``exc``."""
    success, failure = hooks
    if result.outcome is Outcome.SUCCESS:
        if success:
            event: Any = TaskSuccess(job.task, job.message, returned, job.attempt, result.duration)
            run_each(success, event, log)
    elif failure and exc is not None:
        fate = fate_of_failure(result.outcome, job.attempt, max_attempts)
        run_each(failure, TaskFailure(job.task, job.message, exc, job.attempt, fate, result.duration), log)


def report_batch(
    batch: BatchJob,
    results: list[Result],
    rejected: dict[int, PayloadError],
    raised: BaseException | None,
    returned: object,
    hooks: tuple[Sequence[SuccessHook], Sequence[FailureHook]],
    max_attempts: int | None,
    log: BoundLogger,
) -> None:
    """The hooks of each message of a batch call, by its own result."""
    if not (hooks[0] or hooks[1]):
        return
    for job, result in zip(batch.jobs, results, strict=True):
        exc = rejected.get(job.seq) or raised or failure_in(returned, job.message)
        if exc is None and result.outcome is not Outcome.SUCCESS:
            exc = TypeError(result.error)  # a return value the worker could not read: its error, as an exception
        report(result, job, exc, returned, hooks, max_attempts, log)


def run_each(hooks: Sequence[Callable[[Any], object]], event: TaskFailure | TaskSuccess, log: BoundLogger) -> None:
    for hook in hooks:
        try:
            hook(event)
        except TaskCancelled:
            raise  # the daemon ends the task (its timeout also covers its hooks)
        except BaseException as exc:  # a reporting hook must never change the message's fate, even by SystemExit
            log.error(
                "hook.failed",
                hook=getattr(hook, "__qualname__", repr(hook)),
                task=event.task,
                message_id=event.message.message_id,
                error=describe(exc),
                exc_info=exc,
            )

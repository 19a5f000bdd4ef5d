"""Error reporting to Sentry: one event per failed attempt, tagged with the task and message id."""

import os

import sentry_sdk

from consumerd import TaskFailure, on_task_failure, on_worker_start, on_worker_stop


@on_worker_start
def start_sentry() -> None:
    # In each worker, after the fork: the client and its sending thread belong to this process.
    sentry_sdk.init(dsn=os.environ["SENTRY_DSN"])


@on_task_failure
def report_failure(failure: TaskFailure) -> None:
    tags = {"task": failure.task, "message_id": failure.message.message_id, "fate": failure.fate}
    sentry_sdk.capture_exception(failure.exception, tags=tags, extras={"attempt": failure.attempt})


@on_worker_stop
def flush_sentry() -> None:
    sentry_sdk.flush(timeout=2)  # events still queued when the worker exits

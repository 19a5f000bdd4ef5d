"""consumerd: a Pub/Sub consumer daemon that runs each message as a task in a worker process."""

from typing import TYPE_CHECKING, Any

from consumerd.errors import PayloadError, PublishError, Reject, Retry, TaskCancelled
from consumerd.message import Message

if TYPE_CHECKING:
    from consumerd.worker.batch import BatchResult
    from consumerd.worker.hooks import TaskFailure, TaskSuccess
    from consumerd.worker.outputs import publish
    from consumerd.worker.registry import on_task_failure, on_task_success, on_worker_start, on_worker_stop, task

__version__ = "0.2.0"
__all__ = [
    "BatchResult",
    "Message",
    "PayloadError",
    "PublishError",
    "Reject",
    "Retry",
    "TaskCancelled",
    "TaskFailure",
    "TaskSuccess",
    "on_task_failure",
    "on_task_success",
    "on_worker_start",
    "on_worker_stop",
    "publish",
    "task",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # `task` (the registry) is loaded on first use: task modules import it in the fork server, while
    # the supervisor, which only imports `consumerd.*` internals, never loads the registry at all.
    if name in ("task", "on_worker_start", "on_worker_stop", "on_task_failure", "on_task_success"):
        from consumerd.worker import registry

        return getattr(registry, name)
    if name == "publish":
        from consumerd.worker.outputs import publish

        return publish
    if name == "BatchResult":
        from consumerd.worker.batch import BatchResult

        return BatchResult
    if name in ("TaskFailure", "TaskSuccess"):
        from consumerd.worker import hooks

        return getattr(hooks, name)
    raise AttributeError(f"module 'consumerd' has no attribute {name!r}")

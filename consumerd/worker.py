"""Child side of a worker: run one task per job received, report the result, exit when told.

A worker is forked by the fork server (which never imports grpc), runs in its own process group so
a task's own children die with it, and never talks to Pub/Sub: only the supervisor acks. This is
the boundary between task code and consumerd: whatever a task raises or returns is turned into a
`Result` of fixed shape here (an invalid `Retry` delay becomes an ordinary failure).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from typing import Any

from .channel import encode_result, job_reader, recv_frame
from .delivery import valid_retry_after
from .errors import ExitCode, Reject, Retry, TaskCancelled
from .logsetup import get_logger
from .proctitle import set_title, worker_title
from .protocol import MAX_ERROR_CHARS, Job, Outcome, Result
from .registry import Registry
from .tracing import task_span


def reset_process_state() -> None:
    """Undo what the worker inherited from the fork server: signals, wake-up fd, random state."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_DFL)
    # The first stage of a kill (timeout, drain): raise inside the task so its `finally:` blocks
    # run; the supervisor sends SIGKILL after the kill grace if the task ignores it.
    signal.signal(signal.SIGTERM, _cancel)
    # Ctrl-C on a terminal is the supervisor's to handle: it drains and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    random.seed()


def _cancel(_signum: int, _frame: object) -> None:
    raise TaskCancelled("the daemon ended this task (task timeout, or stopping)")


def serve(sock: socket.socket, registry: Registry, max_tasks: int, worker_id: int = 0) -> ExitCode:
    """Run the start hooks, then jobs until the supervisor closes the channel or ``max_tasks`` were
    run, then the stop hooks; return the exit code (CONFIG when a start hook failed)."""
    log = get_logger("consumerd.worker")
    if not run_hooks(registry.start_hooks, "start", log):
        return ExitCode.CONFIG
    code = serve_jobs(sock, registry, max_tasks, worker_id, log)
    run_hooks(registry.stop_hooks, "stop", log)
    return code


def run_hooks(hooks: list[Any], when: str, log: Any) -> bool:
    for hook in hooks:
        try:
            hook()
        except Exception as exc:
            log.error(f"worker.{when}_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=describe(exc), exc_info=exc)
            return False
    return True


def serve_jobs(sock: socket.socket, registry: Registry, max_tasks: int, worker_id: int, log: Any) -> ExitCode:
    reader = job_reader()
    done = 0
    while max_tasks == 0 or done < max_tasks:
        job = recv_frame(sock, reader)
        if job is None:
            return ExitCode.OK
        if not isinstance(job, Job):
            log.error("worker.bad_job", received=type(job).__name__)
            return ExitCode.PROTOCOL
        set_title(worker_title(worker_id, job.task, job.message.message_id))
        result = run_job(job, registry, log)
        sweep_children(log, job)  # before the result: the supervisor may close us right after it
        sock.sendall(encode_result(result))
        set_title(worker_title(worker_id))
        done += 1
    return ExitCode.OK


def sweep_children(log: Any, job: Job) -> None:
    """Kill what the task left running and reap it: children must not outlive their task.

    Direct children are listed by /proc (no scan of every process); a double-forked grandchild is
    reparented to the fork server, a subreaper, which kills every child that is not a worker.
    """
    children = children_of(os.getpid())
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # SIGKILL is prompt: reap it now, no zombie left
        except (ProcessLookupError, ChildProcessError):
            pass
    if children:
        log.warning("task.left_children", message_id=job.message.message_id, task=job.task, killed=len(children))
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children_of(pid: int) -> list[int]:
    """Direct children of the single-threaded process ``pid`` (this one), from /proc: no scan."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def run_job(job: Job, registry: Registry, log: Any) -> Result:
    spec = registry.get(job.task)
    if spec is None:  # the supervisor checks names first; this is a second line of defence
        return Result(job.seq, Outcome.UNKNOWN_TASK, 0.0, f"unknown task {job.task!r}")
    started = time.monotonic()
    try:
        with task_span(job.message, job.task):
            spec.func(job.message)
    except Retry as exc:
        return retry_result(job, exc, time.monotonic() - started, log)
    except Reject as exc:
        return Result(job.seq, Outcome.REJECT, time.monotonic() - started, describe(exc))
    except TaskCancelled:
        raise  # the supervisor ended it: no result; its kill reason says what happened
    except BaseException as exc:
        duration = time.monotonic() - started
        log.warning(
            "task.raised",
            message_id=job.message.message_id,
            task=job.task,
            duration_ms=round(duration * 1000, 3),
            exc_info=exc,
        )
        return Result(job.seq, Outcome.ERROR, duration, describe(exc))
    return Result(job.seq, Outcome.SUCCESS, time.monotonic() - started)


def retry_result(job: Job, exc: Retry, duration: float, log: Any) -> Result:
    """`Retry(after=...)` with a delay that is not a finite number >= 0 is an ordinary failure."""
    after = getattr(exc, "after", None)
    if valid_retry_after(after):
        return Result(job.seq, Outcome.RETRY, duration, describe(exc, with_type=False), retry_after=float(after))  # type: ignore[arg-type]
    error = f"Retry(after={after!r}): the delay must be a finite number >= 0"[:MAX_ERROR_CHARS]
    log.warning("task.bad_retry", message_id=job.message.message_id, task=job.task, error=error)
    return Result(job.seq, Outcome.ERROR, duration, error)


def describe(exc: BaseException, *, with_type: bool = True) -> str:
    """``Type: text`` cut to MAX_ERROR_CHARS; never fails, whatever the exception's __str__ does."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a task's exception may break even its own __str__
        text = "<unprintable>"
    if with_type:
        text = f"{type(exc).__name__}: {text}"
    return text[:MAX_ERROR_CHARS]

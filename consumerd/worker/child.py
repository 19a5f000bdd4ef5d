"""Child side of a worker: run the jobs received, report one result per message, exit when told.

A worker is forked by the fork server (which never imports grpc), runs in its own process group so
a task's own children die with it, and never talks to Pub/Sub: only the supervisor acks. This is
the boundary between task code and consumerd: whatever a task raises or returns is turned into a
`Result` of fixed shape here (an invalid `Retry` delay becomes an ordinary failure).

A frame may carry several jobs (the supervisor queues the next one before this one ends, so the
worker never waits for it); sync jobs run one after the other, results sent as each ends. `async def`
tasks run together on an event loop (`coroutines`), each cancelled at its own timeout.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import time
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.adapters.linux import children_of
from consumerd.adapters.proctitle import set_title, worker_title
from consumerd.errors import ExitCode, TaskCancelled
from consumerd.ipc.framing import encode_result, job_reader, recv_frame
from consumerd.ipc.records import BatchJob, Job, MemoryLimits, Outcome, Result, Unit
from consumerd.logsetup import get_logger
from consumerd.worker.batch import batch_results, describe, fate_of, merged, validate_batch
from consumerd.worker.coroutines import AsyncRunner, raise_cancelled, send_all, valid_units
from consumerd.worker.hooks import report, report_batch
from consumerd.worker.memory import Watch, confine, out_of_memory, release
from consumerd.worker.outputs import collecting
from consumerd.worker.registry import Registry
from consumerd.worker.tracing import task_span


def reset_process_state() -> None:
    """Undo what the worker inherited from the fork server: signals, wake-up fd, random state."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, raise_cancelled)
    # Ctrl-C on a terminal is the supervisor's to handle: it drains and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    random.seed()


def serve(sock: socket.socket, registry: Registry, max_tasks: int, worker_id: int = 0, limits: MemoryLimits = MemoryLimits()) -> ExitCode:
    """Set the worker's memory limits and OOM score, run the start hooks, then jobs until the
    supervisor closes the channel or ``max_tasks`` were run, then the stop hooks; return the exit
    code (CONFIG when a start hook failed, SOFTWARE when not even a result fitted in memory)."""
    log = get_logger("consumerd.worker")
    confine(limits, log)
    if not run_hooks(registry.start_hooks, "start", log):
        return ExitCode.CONFIG
    try:
        code = serve_jobs(sock, registry, max_tasks, worker_id, log, Watch(limits, log))
    except MemoryError:
        log.error("worker.out_of_memory", memory_limit=limits.hard_cap)  # its messages fail as a crash
        return ExitCode.SOFTWARE
    run_hooks(registry.stop_hooks, "stop", log)
    return code


def run_hooks(hooks: list[Any], when: str, log: BoundLogger) -> bool:
    for hook in hooks:
        try:
            hook()
        except Exception as exc:
            log.error(f"worker.{when}_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=describe(exc), exc_info=exc)
            return False
    return True


def serve_jobs(sock: socket.socket, registry: Registry, max_tasks: int, worker_id: int, log: BoundLogger, watch: Watch) -> ExitCode:
    reader = job_reader()
    pending: collections.deque[Unit] = collections.deque()
    runner = AsyncRunner(sock, reader, registry, log, worker_id, watch)
    done = 0
    while max_tasks == 0 or done < max_tasks:
        if not pending:
            units = recv_frame(sock, reader)
            if units is None:
                return ExitCode.OK
            if not valid_units(units):
                log.error("worker.bad_job", received=type(units).__name__)
                return ExitCode.PROTOCOL
            pending.extend(units)
        if registry.is_async(pending[0].task):
            done += runner.run(pending)  # runs the leading async jobs and those that arrive meanwhile
            if runner.closed and not pending:
                return ExitCode.OK
            continue
        unit = pending.popleft()
        run_sync(unit, sock, registry, log, worker_id, watch)
        done += 1
    return ExitCode.OK


def run_sync(unit: Unit, sock: socket.socket, registry: Registry, log: BoundLogger, worker_id: int, watch: Watch) -> None:
    first = unit.jobs[0] if isinstance(unit, BatchJob) else unit
    set_title(worker_title(worker_id, unit.task, first.message.message_id))
    try:
        results = run_batch(unit, registry, log) if isinstance(unit, BatchJob) else [run_job(unit, registry, log)]
    except MemoryError:  # reporting the task's failure ran out of memory too (the task's own MemoryError is a result)
        results = out_of_memory(unit)
    sweep_children(log, first)  # before the result: the supervisor may close us right after it
    send_all(sock, b"".join(encode_result(r) for r in watch.after(results)))
    set_title(worker_title(worker_id))


def sweep_children(log: BoundLogger, job: Job) -> None:
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


def run_job(job: Job, registry: Registry, log: BoundLogger) -> Result:
    spec = registry.get(job.task)
    if spec is None:  # the supervisor checks names first; this is a second line of defence
        return Result(job.seq, Outcome.UNKNOWN_TASK, 0.0, f"unknown task {job.task!r}")
    started = time.monotonic()
    try:
        with task_span(job.message, job.task), collecting(job.seq) as outputs:
            returned = spec.call(job.message)
    except TaskCancelled:
        raise  # the supervisor ended it: no result; its kill reason says what happened
    except BaseException as exc:  # noqa: BLE001 - whatever a task raises fails its message only (logged in `failed`)
        result = failed(job, exc, time.monotonic() - started, log)
        report(result, job, exc, None, registry.task_hooks(), spec.options.max_attempts, log)
        return result
    result = Result(job.seq, Outcome.SUCCESS, time.monotonic() - started, outputs=tuple(outputs.items))
    report(result, job, None, returned, registry.task_hooks(), spec.options.max_attempts, log)
    return result


def failed(job: Job, exc: BaseException, duration: float, log: BoundLogger) -> Result:
    """The result of a task that raised ``exc`` (Retry, Reject, or any failure)."""
    release(exc)
    fate = fate_of(exc)
    if fate.outcome is Outcome.ERROR:
        log.warning(
            "task.raised",
            message_id=job.message.message_id,
            task=job.task,
            duration_ms=round(duration * 1000, 3),
            exc_info=exc,
        )
    return Result(job.seq, fate.outcome, duration, fate.error, fate.retry_after)


def run_batch(batch: BatchJob, registry: Registry, log: BoundLogger) -> list[Result]:
    """One call with every message of the batch; one result per message."""
    spec = registry.get(batch.task)
    if spec is None:
        return [Result(j.seq, Outcome.UNKNOWN_TASK, 0.0, f"unknown task {batch.task!r}") for j in batch.jobs]
    started = time.monotonic()
    members, values, rejected = validate_batch(batch, spec.signature)  # invalid payloads: rejected alone
    raised: BaseException | None = None
    returned: object = None
    results: list[Result] = []
    if members is not None:
        try:
            with task_span(members.jobs[0].message, batch.task, batch=True), collecting(batch.seq, batch=True):
                returned = spec.signature.call_batch(spec.func, [j.message for j in members.jobs], values)
        except TaskCancelled:
            raise
        except BaseException as exc:  # noqa: BLE001 - the same, for every message of the batch
            raised = exc
            results = [failed(j, exc, time.monotonic() - started, log) for j in members.jobs]
        else:
            results = batch_results(members, returned, time.monotonic() - started, log)
    results = merged(batch, rejected, results)
    report_batch(batch, results, rejected, raised, returned, registry.task_hooks(), spec.options.max_attempts, log)
    return results

"""Child side of a worker: run one task per job received, report the result, exit when told.

A worker is forked by the fork server (which never imports grpc), runs in its own process group so
a task's own children die with it, and never talks to Pub/Sub: only the supervisor acks.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time

from . import delivery
from .channel import FrameReader, encode, recv_frame
from .errors import Reject, Retry
from .logsetup import get_logger
from .protocol import Job, Result
from .registry import Registry


def reset_process_state() -> None:
    """Undo what the worker inherited from the fork server: signals, wake-up fd, random state."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_DFL)
    # Ctrl-C on a terminal is the supervisor's to handle: it drains and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    random.seed()


def serve(sock: socket.socket, registry: Registry, max_tasks: int) -> int:
    """Run jobs until the supervisor closes the channel or ``max_tasks`` were run; return the exit code."""
    log = get_logger("consumerd.worker")
    reader = FrameReader()
    done = 0
    while max_tasks == 0 or done < max_tasks:
        job = recv_frame(sock, reader)
        if job is None:
            return 0
        if not isinstance(job, Job):
            log.error("worker.bad_job", received=type(job).__name__)
            return 2
        result = run_job(job, registry, log)
        sweep_children(log, job)  # before the result: the supervisor may close us right after it
        sock.sendall(encode(result))
        done += 1
    return 0


def sweep_children(log: object, job: Job) -> None:
    """Kill what the task left running and reap it: children must not outlive their task.

    Direct children are listed by /proc (no scan of every process); a double-forked grandchild is
    reparented to the fork server, a subreaper, and dies with this worker's process group.
    """
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # SIGKILL is prompt: reap it now, no zombie left
        except (ProcessLookupError, ChildProcessError):
            pass
    if children:
        log.warning("task.left_children", message_id=job.message.message_id, task=job.task, killed=len(children))  # type: ignore[attr-defined]
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_job(job: Job, registry: Registry, log: object) -> Result:
    spec = registry.get(job.task)
    if spec is None:  # the supervisor checks names first; this is a second line of defence
        return Result(job.seq, delivery.UNKNOWN_TASK, 0.0, f"unknown task {job.task!r}")
    started = time.monotonic()
    try:
        spec.func(job.message)
    except Retry as exc:
        return Result(job.seq, delivery.RETRY, time.monotonic() - started, str(exc), retry_after=exc.after)
    except Reject as exc:
        return Result(job.seq, delivery.REJECT, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - the worker's boundary: any raise is a task failure
        duration = time.monotonic() - started
        log.warning(  # type: ignore[attr-defined]
            "task.raised",
            message_id=job.message.message_id,
            task=job.task,
            duration_ms=round(duration * 1000, 3),
            exc_info=exc,
        )
        return Result(job.seq, delivery.ERROR, duration, f"{type(exc).__name__}: {exc}")
    return Result(job.seq, delivery.SUCCESS, time.monotonic() - started)

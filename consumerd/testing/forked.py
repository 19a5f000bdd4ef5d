"""A task run in a real forked worker: the worker's own `serve` over a socketpair, as the fork
server runs it, and the pool's way of ending it (SIGTERM to its process group at the timeout,
SIGKILL after the grace). Whatever the task does to its process (``os._exit``, a signal, a leaked
child) stays in that process, and becomes the outcome the supervisor would see."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from consumerd.adapters.linux import kill_group
from consumerd.errors import ExitCode, TaskCancelled, WorkerProtocolError
from consumerd.ipc.framing import encode_units, result_reader
from consumerd.ipc.records import BatchJob, Outcome, Result, Unit
from consumerd.pool.handles import describe_status, timeout_detail
from consumerd.pool.pool import KILL_GRACE
from consumerd.worker import outputs
from consumerd.worker.child import reset_process_state, serve
from consumerd.worker.registry import Registry

EXIT_WAIT = 10.0  # seconds a worker may take to exit once its channel closed (its stop hooks run)


def run_forked(unit: Unit, registry: Registry, limit: float | None) -> list[Result]:
    """The results a forked worker sends for ``unit``; a worker that died or was ended without
    sending one gets the result the supervisor would settle it with (crash, or timeout)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns here
        ours.close()
        _become_worker(theirs, registry)
    theirs.close()
    try:
        os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
    except OSError:
        pass
    jobs = unit.jobs if isinstance(unit, BatchJob) else (unit,)
    # A coroutine cancels itself at its timeout; the pool ends its worker only if it ignores that.
    coroutine = registry.is_async(unit.task)
    deadline = limit + KILL_GRACE if limit and coroutine else limit
    results: dict[int, Result] = {}
    timed_out = False
    try:
        ours.sendall(encode_units([unit]))
        timed_out = _collect(ours, results, len(jobs), deadline)
    except (OSError, WorkerProtocolError):
        kill_group(pid, signal.SIGKILL)  # it broke the channel: the pool kills such a worker at once
    if timed_out:
        kill_group(pid, signal.SIGKILL if coroutine else signal.SIGTERM)
    ours.close()  # without a timeout, the worker's `serve` returns, runs its stop hooks and exits
    status = _wait(pid, KILL_GRACE if timed_out else EXIT_WAIT)
    if status is None:
        kill_group(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    kill_group(pid, signal.SIGKILL)  # whatever the task left in its group
    if timed_out:
        error = timeout_detail(limit or 0.0, cancellation_ignored=coroutine)
        return [results.get(j.seq) or Result(j.seq, Outcome.TIMEOUT, limit or 0.0, error) for j in jobs]
    return [results.get(j.seq) or Result(j.seq, Outcome.CRASH, 0.0, describe_status(status)) for j in jobs]


def _become_worker(sock: socket.socket, registry: Registry) -> None:
    code = ExitCode.SOFTWARE
    try:
        os.setpgid(0, 0)
        reset_process_state()
        code = serve(sock, registry, 0)
    except TaskCancelled:
        code = ExitCode.TERMINATED
    except BaseException:  # noqa: BLE001 - a forked child must never return into the test run
        code = ExitCode.SOFTWARE
    finally:
        os._exit(code)


def _collect(sock: socket.socket, results: dict[int, Result], wanted: int, limit: float | None) -> bool:
    """Read results until there are ``wanted``, the worker closed the channel, or the time is up
    (then True)."""
    reader = result_reader(outputs.rules())
    deadline = time.monotonic() + limit if limit else None
    while len(results) < wanted:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([sock], [], [], wait)[0]:
            return True
        data = sock.recv(1 << 20)
        if not data:
            return False
        reader.feed(data)  # validated as the supervisor does: garbage is a WorkerProtocolError
        for result in reader.take():
            results[result.seq] = result
    return False


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)

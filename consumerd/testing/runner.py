"""`run_task`: a task run through the worker's own code, in this process or in a forked worker.

The worker functions that turn a job into a `Result` (`worker.child.run_job` and `run_batch`, the
event loop of `worker.coroutines` for `async def` tasks) run here unchanged, and each result goes
through its JSON encoding and validation as it would on the way to the supervisor; the daemon's
delivery policy then says what would happen to the message (`outcomes`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import setproctitle

from consumerd.errors import TaskCancelled
from consumerd.ipc.framing import encode_result, job_reader, result_reader
from consumerd.ipc.outputs import PublishRules
from consumerd.ipc.records import BatchJob, Job, Outcome, Result, Unit
from consumerd.logsetup import get_logger
from consumerd.message import Message
from consumerd.pool.handles import timeout_detail
from consumerd.testing.forked import run_forked
from consumerd.testing.messages import make_message
from consumerd.testing.outcomes import TaskOutcome, outcome_of
from consumerd.worker import outputs
from consumerd.worker.child import run_batch, run_job
from consumerd.worker.coroutines import AsyncRunner, raise_cancelled
from consumerd.worker.registry import REGISTRY, Registry, TaskFunc, TaskSpec

_seqs = itertools.count(1)


def run_task(
    task: str | TaskFunc,
    message_or_data: Any,
    *,
    isolated: bool = False,
    timeout: float | None = None,
    registry: Registry | None = None,
    publish_topics: Sequence[str] | None = None,
    **message_fields: Any,
) -> TaskOutcome | list[TaskOutcome]:
    """Run ``task`` (a registered name, or a function, registered or not) on one message and say
    what the daemon would do with it: a `TaskOutcome`; a batch task gives a list, one per message.

    ``message_or_data`` is a `Message` or the data for `make_message` (``message_fields`` are its
    other arguments); for a batch task, a list of those. ``timeout`` (default: the task's own) ends
    the task with `TaskCancelled` inside it, an async one with a cancellation, as the daemon does.
    ``isolated=True`` runs it in a forked worker process: a crash, ``os._exit`` or a signal is then
    the task's outcome (``crash``), not the end of the test run, and the worker hooks run there.
    In this process, tasks run in the main thread (a timeout is a signal); the task hooks
    (`on_task_failure`, `on_task_success`) run, the worker hooks (`on_worker_start`/`stop`) do not.
    What the task published is on each outcome's ``published`` (a success only); a publish to a
    topic outside ``publish_topics`` fails the task, as `[publish] topics` does in the daemon
    (default: any topic is accepted).
    """
    registry, spec = _resolve(task, registry or REGISTRY)
    batch = spec.options.batch_size is not None
    items = list(message_or_data) if batch and isinstance(message_or_data, list | tuple) else [message_or_data]
    messages = [m if isinstance(m, Message) else make_message(m, **message_fields) for m in items]
    limit = timeout if timeout is not None else spec.options.timeout
    jobs = tuple(Job(next(_seqs), spec.name, m, limit or 0.0, m.delivery_attempt or 1) for m in messages)
    unit: Unit = BatchJob(spec.name, jobs, limit or 0.0) if batch else jobs[0]
    if not isolated and (spec.options.is_async or limit) and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"run_task({spec.name!r}): an async task or a timeout needs the main thread here (signals); use isolated=True")
    rules = PublishRules(None if publish_topics is None else frozenset(publish_topics))
    with _publishing(rules):
        if isolated:
            results = run_forked(unit, registry, limit)
        elif spec.options.is_async:
            results = _run_async(unit, registry)
        else:
            results = _run_sync(unit, registry, limit)
    by_seq = {r.seq: r for r in results}
    lost = Result(0, Outcome.CRASH, 0.0, "the worker sent no result")  # as the supervisor settles a silent worker
    outcomes = [outcome_of(j.message.message_id, by_seq.get(j.seq, lost), j.message.delivery_attempt or 1, spec.options) for j in jobs]
    return outcomes if batch else outcomes[0]


def _resolve(task: str | TaskFunc, registry: Registry) -> tuple[Registry, TaskSpec]:
    if isinstance(task, str):
        spec = registry.get(task)
        if spec is None:
            known = ", ".join(s.name for s in registry.specs()) or "none"
            raise LookupError(f"no task named {task!r} is registered (known: {known}); is its module imported?")
        return registry, spec
    for spec in registry.specs():
        if spec.func is task:
            return registry, spec
    # An undecorated function: a registry of its own, with the default options.
    own = Registry()
    own.register(getattr(task, "__qualname__", "task"), task)
    [spec] = own.specs()
    return own, spec


@contextlib.contextmanager
def _publishing(rules: PublishRules) -> Iterator[None]:
    """What `consumerd.publish` may do while the task runs (in a forked worker too: it inherits it)."""
    previous = outputs.rules()
    outputs.configure(rules)
    try:
        yield
    finally:
        outputs.configure(previous)


def _checked(results: Sequence[Result]) -> list[Result]:
    """Through the encoding and validation a result (and its outputs) gets on its way to the supervisor."""
    reader = result_reader(outputs.rules())
    reader.feed(b"".join(encode_result(r) for r in results))
    return reader.take()


def _run_sync(unit: Unit, registry: Registry, limit: float | None) -> list[Result]:
    log = get_logger("consumerd.worker")
    jobs = unit.jobs if isinstance(unit, BatchJob) else (unit,)
    if not limit:
        return _checked(_call(unit, registry, log))
    # The timer is this process's only one: an outer one (pytest-timeout's) is put back afterwards
    # with the time it has left.
    previous = signal.signal(signal.SIGALRM, raise_cancelled)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return _checked(_call(unit, registry, log))
    except TaskCancelled:
        return [Result(j.seq, Outcome.TIMEOUT, limit, timeout_detail(limit)) for j in jobs]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def _call(unit: Unit, registry: Registry, log: Any) -> list[Result]:
    return run_batch(unit, registry, log) if isinstance(unit, BatchJob) else [run_job(unit, registry, log)]


def _run_async(unit: Unit, registry: Registry) -> list[Result]:
    """The worker's event loop over a socketpair, as in a worker; this process's SIGTERM handler
    and title are put back afterwards (the loop installs the worker's own)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received = bytearray()
    drain = threading.Thread(target=_read_all, args=(ours, received), daemon=True)  # results never fill the buffer
    drain.start()
    runner = AsyncRunner(theirs, job_reader(), registry, get_logger("consumerd.worker"), 0)
    previous, title = signal.getsignal(signal.SIGTERM), setproctitle.getproctitle()
    try:
        runner.run(collections.deque([unit]))
    finally:
        if runner._runner is not None:  # a worker's loop lives until its process ends; this one ends here
            runner._runner.close()
        signal.signal(signal.SIGTERM, previous)
        setproctitle.setproctitle(title)
        theirs.shutdown(socket.SHUT_WR)
        drain.join()
        theirs.close()
        ours.close()
    reader = result_reader(outputs.rules())
    reader.feed(bytes(received))
    return reader.take()


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        into += chunk

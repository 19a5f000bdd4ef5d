"""The worker's event loop for `async def` tasks: up to `async_concurrency` coroutines at once.

A worker runs either one sync task or any number of coroutines (the supervisor decides how many it
sends). While coroutines run, the loop keeps reading the channel, so new jobs start at once and
results go back as each coroutine ends. Each coroutine is cancelled at its own timeout (its
`finally:` blocks and `except CancelledError` run); one that ignores the cancellation is the
supervisor's to end, with SIGKILL to the whole worker after the kill grace. SIGTERM (a timeout of a
sibling that blocks the loop, a drain past its deadline) cancels every coroutine, then the worker
exits 143. The loop lives as long as the worker: uvloop's when it is installed, asyncio's otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import select
import signal
import socket
import time
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.adapters.proctitle import set_title, worker_title
from consumerd.errors import TaskCancelled
from consumerd.ipc.framing import FrameReader, encode_result
from consumerd.ipc.records import BatchJob, Job, MemoryLimits, Outcome, Result, Unit
from consumerd.worker.batch import batch_results, fate_of, merged, validate_batch
from consumerd.worker.hooks import report, report_batch
from consumerd.worker.memory import Watch, out_of_memory, release
from consumerd.worker.outputs import collecting
from consumerd.worker.registry import Registry, TaskSpec
from consumerd.worker.tracing import task_span


class AsyncRunner:
    def __init__(
        self,
        sock: socket.socket,
        reader: FrameReader[Any],
        registry: Registry,
        log: BoundLogger,
        worker_id: int,
        watch: Watch | None = None,
    ) -> None:
        self.sock = sock
        self.reader = reader
        self.registry = registry
        self.log = log
        self.worker_id = worker_id
        self.watch = watch or Watch(MemoryLimits(), log)  # flags the result after which the worker retires
        self.closed = False  # the supervisor closed the channel
        self._runner: asyncio.Runner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._terminating = False

    def run(self, pending: collections.deque[Unit]) -> int:
        """Run the async jobs at the head of ``pending`` and those that arrive while any runs; sync
        jobs that arrive meanwhile are left on ``pending``. Returns how many jobs ran."""
        if self._runner is None:
            self._runner = asyncio.Runner(loop_factory=_loop_factory())
        return self._runner.run(self._session(pending))

    async def _session(self, pending: collections.deque[Unit]) -> int:
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()
        count = 0

        def finished(task: asyncio.Task[None]) -> None:
            nonlocal count
            self._tasks.discard(task)
            count += 1
            if not self._tasks:
                idle.set()

        def start_leading() -> None:
            while pending and self.registry.is_async(pending[0].task) and not self._terminating:
                task = loop.create_task(self._run_unit(pending.popleft()))
                self._tasks.add(task)
                task.add_done_callback(finished)
            if not self._tasks:
                idle.set()

        def readable() -> None:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.closed = True
                loop.remove_reader(self.sock)
                idle.set()
                return
            self.reader.feed(data)
            for units in self.reader.take():
                if valid_units(units):
                    pending.extend(units)
                else:
                    self.log.error("worker.bad_job", received=type(units).__name__)
            start_leading()

        start_leading()
        self.sock.setblocking(False)
        loop.add_reader(self.sock, readable)
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        set_title(f"{worker_title(self.worker_id)} async")
        try:
            while self._tasks:
                await idle.wait()
                idle.clear()
        finally:
            loop.remove_reader(self.sock)
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, raise_cancelled)
            self.sock.setblocking(True)
            set_title(worker_title(self.worker_id))
        if self._terminating:
            raise TaskCancelled("the daemon stopped this worker's coroutines")
        return count

    def _terminate(self) -> None:
        self._terminating = True
        for task in self._tasks:
            task.cancel()

    async def _run_unit(self, unit: Unit) -> None:
        try:
            results = await self._run_batch(unit) if isinstance(unit, BatchJob) else [await self._run_job(unit)]
        except MemoryError:  # reporting the task's failure ran out of memory too
            results = out_of_memory(unit)
        if self._terminating:
            return  # no result: the supervisor ended it and decides what it means
        # Past its memory limits the worker takes no new coroutine; the running ones finish first.
        send_all(self.sock, b"".join(encode_result(r) for r in self.watch.after(results)))

    async def _run_job(self, job: Job) -> Result:
        spec = self.registry.get(job.task)
        if spec is None:
            return Result(job.seq, Outcome.UNKNOWN_TASK, 0.0, f"unknown task {job.task!r}")
        result, exc, returned = await self._attempt(job, spec)
        report(result, job, exc, returned, self.registry.task_hooks(), spec.options.max_attempts, self.log)
        return result

    async def _attempt(self, job: Job, spec: TaskSpec) -> tuple[Result, BaseException | None, object]:
        started = time.monotonic()
        deadline = asyncio.timeout(job.timeout or None)
        try:
            async with deadline:
                with task_span(job.message, job.task), collecting(job.seq) as outputs:
                    returned = await spec.call(job.message)  # type: ignore[misc]
        except TimeoutError as exc:
            if deadline.expired():
                error = f"TaskTimeout: cancelled after {job.timeout:g}s"
                return Result(job.seq, Outcome.TIMEOUT, time.monotonic() - started, error), exc, None
            return self._failed(job, exc, started), exc, None
        except asyncio.CancelledError:
            if self._terminating:
                raise
            cancelled = TaskCancelled("the coroutine was cancelled")
            return self._failed(job, cancelled, started), cancelled, None
        except BaseException as exc:  # noqa: BLE001 - whatever a task raises fails only its message
            return self._failed(job, exc, started), exc, None
        return Result(job.seq, Outcome.SUCCESS, time.monotonic() - started, outputs=tuple(outputs.items)), None, returned

    async def _run_batch(self, batch: BatchJob) -> list[Result]:
        spec = self.registry.get(batch.task)
        if spec is None:
            return [Result(j.seq, Outcome.UNKNOWN_TASK, 0.0, f"unknown task {batch.task!r}") for j in batch.jobs]
        members, values, rejected = validate_batch(batch, spec.signature)  # invalid payloads: rejected alone
        results: list[Result] = []
        raised: BaseException | None = None
        returned: object = None
        if members is not None:
            results, raised, returned = await self._attempt_batch(members, spec, values)
        results = merged(batch, rejected, results)
        report_batch(batch, results, rejected, raised, returned, self.registry.task_hooks(), spec.options.max_attempts, self.log)
        return results

    async def _attempt_batch(self, batch: BatchJob, spec: TaskSpec, values: list[Any]) -> tuple[list[Result], BaseException | None, object]:
        started = time.monotonic()
        deadline = asyncio.timeout(batch.timeout or None)
        try:
            async with deadline:
                with collecting(batch.seq, batch=True):
                    returned = await spec.signature.call_batch(spec.func, [j.message for j in batch.jobs], values)  # type: ignore[misc]
        except TimeoutError as exc:
            if deadline.expired():
                error = f"TaskTimeout: cancelled after {batch.timeout:g}s"
                return [Result(j.seq, Outcome.TIMEOUT, time.monotonic() - started, error) for j in batch.jobs], exc, None
            return [self._failed(j, exc, started) for j in batch.jobs], exc, None
        except asyncio.CancelledError:
            if self._terminating:
                raise
            cancelled = TaskCancelled("the coroutine was cancelled")
            return [self._failed(j, cancelled, started) for j in batch.jobs], cancelled, None
        except BaseException as exc:  # noqa: BLE001
            return [self._failed(j, exc, started) for j in batch.jobs], exc, None
        return batch_results(batch, returned, time.monotonic() - started, self.log), None, returned

    def _failed(self, job: Job, exc: BaseException, started: float) -> Result:
        duration = time.monotonic() - started
        release(exc)
        fate = fate_of(exc)
        if fate.outcome is Outcome.ERROR:
            self.log.warning(
                "task.raised", message_id=job.message.message_id, task=job.task, duration_ms=round(duration * 1000, 3), exc_info=exc
            )
        return Result(job.seq, fate.outcome, duration, fate.error, fate.retry_after)


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send every byte, whether the socket blocks or not (the event loop keeps it non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            select.select([], [sock], [])


def raise_cancelled(_signum: int, _frame: object) -> None:
    """SIGTERM in a sync task: the first stage of a kill (timeout, drain). Raised inside the task so
    its `finally:` blocks run; the supervisor sends SIGKILL after the kill grace if it ignores it."""
    raise TaskCancelled("the daemon ended this task (task timeout, or stopping)")


def valid_units(units: object) -> bool:
    """A frame from the supervisor: a non-empty tuple of jobs."""
    return isinstance(units, tuple) and bool(units) and all(isinstance(u, Job | BatchJob) for u in units)


def _loop_factory() -> Any:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # an optional extra
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop

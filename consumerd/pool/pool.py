"""Parent side of the workers: start fork servers, spawn, feed, read results, time out, kill, reap.

The pool does mechanics only; what a result or an exit means for a message is the supervisor's call.
It owns every fact about a worker (what it runs, since when, until when, whether it is dying): the
supervisor asks (`overdue`, `next_deadline`, `running`) instead of reading a worker's fields.

Workers come from a fork server, one per generation of task code (`generation`). A reload's new code
starts a second one (`begin`); while it loads, the current workers take new jobs as before, but none
queued behind a running one. Once it is ready and wanted (`promote`), new jobs go to its workers
only; the old workers finish what they run on the old code and exit, and the old fork server stops
after its last worker. New workers are asked for as old ones free up, so old and new together never
exceed the pool's size: `workers.concurrency` is what the host can take (cores, memory, connections),
and a reload must not overshoot it. Every fork server's channel is behind one descriptor
(`control_fd`): the supervisor watches one, whatever the number of generations.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from consumerd.adapters.linux import kill_group
from consumerd.config import Settings
from consumerd.errors import ConfigError, WorkerProtocolError
from consumerd.ipc.framing import encode_units, send_frames
from consumerd.ipc.held import InFlight
from consumerd.ipc.outputs import PublishRules
from consumerd.ipc.records import BatchJob, CodeFile, ForkServerSpec, Job, MemoryLimits, PreloadFailed, Ready, Result, TaskOptions, Unit
from consumerd.pool.generation import ForkServerDied, GenerationStatus, Launch, launch
from consumerd.pool.handles import (
    GenerationRetired,
    KillReason,
    Mode,
    PoolEvent,
    WorkerExited,
    WorkerHandle,
    WorkerResult,
    WorkerStarted,
    timeout_detail,
)
from consumerd.pool.sandbox import hidden_from_tasks
from consumerd.pool.succession import Succession

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to a worker's process group
START_TIMEOUT = 60.0  # seconds a reload's new code may take to load before it is given up
# What the supervisor, the tests and consumerd.testing import from here (the events are handles').
__all__ = [
    "KILL_GRACE",
    "ForkServerDied",
    "KillReason",
    "Pool",
    "RunningJob",
    "WorkerExited",
    "WorkerResult",
    "WorkerStarted",
    "fork_server_spec",
]


def fork_server_spec(settings: Settings) -> ForkServerSpec:
    """The fork server imports what the supervisor would: same sys.path, modules and logging."""
    return ForkServerSpec(
        sys_path=tuple(sys.path),
        modules=tuple(settings.tasks.modules),
        log_format=settings.logging.format,
        log_level=settings.logging.level,
        max_tasks_per_child=settings.workers.max_tasks_per_child,
        tracing=settings.tracing.enabled,
        environment=tuple(settings.workers.environment.items()),
        hidden_paths=hidden_from_tasks(os.environ) if settings.workers.hide_credentials else (),
        project=settings.pubsub.project,
        publish=PublishRules.of(settings),
        memory=MemoryLimits(settings.workers.max_memory_per_child, settings.workers.memory_limit),
    )


@dataclasses.dataclass(frozen=True)
class RunningJob:
    pid: int
    inflight: InFlight
    started_at: float  # monotonic
    generation: int = 0  # of the task code its worker runs


class Pool:
    def __init__(self, spec: ForkServerSpec, size: int, forget: Callable[[Any], None], launch: Launch = launch) -> None:
        self.spec = spec  # the current generation's (a reload's new code comes with its own, `begin`)
        self._forget = forget  # called before a channel is closed (the caller's selector drops it)
        self.size = size
        self.workers: dict[int, WorkerHandle] = {}  # the current generation's, by pid
        self.succession = Succession(launch, self._close)
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    # -- fork servers ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> dict[str, TaskOptions]:
        """Start the fork server, wait until it imported the task modules; return their tasks' options."""
        reply = self.succession.first(self.spec, self.workers, timeout)
        if isinstance(reply, PreloadFailed):
            raise ConfigError(reply.error)
        if not isinstance(reply, Ready):
            raise ForkServerDied(f"fork server sent {type(reply).__name__} before Ready")
        return dict(reply.tasks)

    @property
    def control_fd(self) -> int:
        """Every fork server's channel, behind one descriptor: readable when any has a packet."""
        return self.succession.fileno()

    def read_control(self, now: float) -> list[PoolEvent]:
        """Fork servers have packets: spawned workers, exit statuses, new code's Ready or failure."""
        return self.succession.read(now)

    @property
    def generation(self) -> int:
        """The current generation's number: 1 until a reload brought new code."""
        return self.succession.current.number if self.succession.current else 0

    def code_files(self) -> tuple[CodeFile, ...]:
        """The files the current generation's code came from, as they were when it loaded them."""
        return self.succession.current.files if self.succession.current else ()

    def generations(self, now: float) -> list[GenerationStatus]:
        return self.succession.statuses(now)

    def begin(self, spec: ForkServerSpec, now: float, timeout: float = START_TIMEOUT) -> int:
        """Start a fork server for new task code beside the current one (one still starting is
        stopped); its `GenerationReady` or `GenerationFailed` comes from `read_control`. Until then no
        job is queued behind a running one (`pick`): the switch leaves none waiting on old code."""
        return self.succession.begin(spec, now, timeout)

    def discard_starting(self, now: float) -> None:
        self.succession.discard_starting(now)

    def promote(self, now: float) -> list[GenerationRetired]:
        """The new code is ready and wanted: new jobs go to its workers from now on; the old workers
        finish what they run, then exit. New workers are asked for as old ones free up."""
        events = self.succession.promote(now)
        current = self.succession.current
        assert current is not None
        self.spec, self.workers = current.spec, current.workers
        self.spawn_missing()
        return events

    # -- workers ---------------------------------------------------------------------------
    def _all(self) -> Iterator[WorkerHandle]:
        """Every worker: the current generation's and those of generations that are finishing."""
        yield from self.workers.values()
        yield from self.succession.finishing_workers()

    def spawn_missing(self) -> int:
        """Ask for workers until the pool has ``size``, counting those on their way and a replaced
        generation's workers that still run a task: they hold their place until they finish."""
        gen = self.succession.current
        assert gen is not None
        live = sum(1 for w in self.workers.values() if w.live)
        finishing = sum(1 for w in self.succession.finishing_workers() if w.slots and w.kill_escalate_at is None)
        missing = self.size - live - gen.pending_spawns - finishing
        for _ in range(max(0, missing)):
            gen.spawn(next(self._ids))
        return max(0, missing)

    def retire_surplus(self) -> int:
        """After the pool shrank: close idle workers beyond ``size``; busy ones take no new job and
        are closed once they hold none (`read_worker`)."""
        live = [w for w in self.workers.values() if w.live]
        surplus = len(live) + (self.succession.current.pending_spawns if self.succession.current else 0) - self.size
        retired = 0
        for worker in sorted(live, key=lambda w: len(w.slots)):  # idle ones first
            if retired >= surplus:
                break
            worker.retiring = True
            if not worker.slots:
                self._close(worker)  # it exits by itself when its channel closes
            retired += 1
        return retired

    def idle_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.idle]

    def pick(self, mode: Mode, depth: int, reserve: bool = False) -> WorkerHandle | None:
        """The current generation's worker with the most room for a call of ``mode``, up to ``depth``
        calls deep (while new code loads, sync calls go to idle workers only). A busy sync worker
        whose queue is still half full is passed over: it is refilled later, many jobs in one frame.
        With ``reserve``, when none can take it, the least busy worker of the other kind is left to
        run dry and then takes only ``mode``."""
        if self.succession.loading and mode is Mode.SYNC:
            depth = 1
        best, room = None, 0
        for worker in self.workers.values():
            if worker.reserved is not None and worker.reserved is not mode:
                continue
            r = worker.room(mode, depth)
            if mode is Mode.SYNC and worker.busy and r < depth // 2:
                continue
            if r > room:
                best, room = worker, r
        if best is None and reserve and not any(w.reserved is mode for w in self.workers.values()):
            others = [w for w in self.workers.values() if w.live and w.mode is not None and w.mode is not mode]
            if others:
                min(others, key=lambda w: len(w.slots)).reserved = mode
        return best

    def resize(self, size: int) -> None:
        """Keep ``size`` workers: idle surplus ones retire now, busy ones when they finish."""
        self.size = size
        self.retire_surplus()

    def worker_count(self) -> int:
        return sum(1 for _ in self._all())

    def running(self) -> list[InFlight]:
        """The messages workers are running now (not those queued behind them)."""
        return [job.inflight for job in self.jobs()]

    def queued(self) -> list[InFlight]:
        """Messages sent to a worker that has not started them yet."""
        return [s.inflight for w in self._all() for s in w.slots.values() if s.started_at is None]

    def jobs(self) -> list[RunningJob]:
        """What runs now, worker by worker (for `consumerd status`)."""
        return [RunningJob(w.pid, s.inflight, s.started_at, w.generation) for w in self._all() for s in w.started()]  # type: ignore[arg-type]

    def busy_count(self) -> int:
        """Messages the workers hold, running or queued."""
        return sum(len(w.slots) for w in self._all())

    def assign(self, worker: WorkerHandle, unit: list[InFlight], mode: Mode, timeout: float, now: float, batch: bool = False) -> None:
        """Add one call (one message, or a batch's) to the worker's next frame (`flush` sends it)."""
        jobs = tuple(Job(next(self._seq), inflight.task, inflight.message, timeout, inflight.attempt) for inflight in unit)
        worker.hold(list(zip(jobs, unit, strict=True)), mode, timeout, now, KILL_GRACE)
        worker.outbox.append(BatchJob(unit[0].task, jobs, timeout) if batch else jobs[0])

    def flush(self, now: float) -> None:
        """Send each worker the jobs assigned to it since the last flush, in one frame."""
        for worker in list(self._all()):
            if worker.outbox:
                units: list[Unit] = worker.outbox
                worker.outbox = []
                try:
                    send_frames(worker.sock, encode_units(units))
                except OSError as exc:  # died, or stuck not reading: it is killed and its jobs fail
                    self.kill(worker, KillReason.SEND_FAILED, now, f"could not send job: {type(exc).__name__}", grace=0)

    def read_worker(self, worker: WorkerHandle, now: float) -> list[PoolEvent]:
        """Results the worker sent; at end of stream or garbage the worker is killed (exit follows)."""
        try:
            data = worker.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self._close(worker)
            if worker.slots:  # it crashed, or closed its channel mid-task: make sure it is gone
                self.kill(worker, KillReason.CHANNEL_CLOSED, now, grace=0)  # the exit status will tell why
            return []
        try:
            worker.reader.feed(data)
            events: list[PoolEvent] = [self._result(worker, result, now) for result in worker.reader.take()]
        except WorkerProtocolError as exc:
            self.kill(worker, KillReason.PROTOCOL_ERROR, now, f"protocol error: {exc}", grace=0)
            return []
        if worker.retiring and not worker.slots:
            self._close(worker)
        return events

    @staticmethod
    def _result(worker: WorkerHandle, result: Result, now: float) -> WorkerResult:
        slot, ran_for = worker.release(result.seq, now)
        if result.over_memory:
            worker.retire_for_memory()  # closed once it holds nothing (`read_worker`), then it exits
        return WorkerResult(worker, slot.inflight, result, ran_for)

    # -- timeouts and kills ------------------------------------------------------------------
    def overdue(self, now: float) -> list[WorkerHandle]:
        """Workers running a job past its deadline that are not being killed yet."""
        return [w for w in self._all() if w.kill_escalate_at is None and any(now >= s.deadline for s in w.started())]

    def kill_overdue(self, now: float) -> int:
        overdue = self.overdue(now)
        for worker in overdue:
            late = [s for s in worker.started() if now >= s.deadline]
            for slot in late:
                slot.timed_out = True
            timeout = late[0].timeout
            if worker.mode is Mode.ASYNC:  # it was cancelled at its timeout and ignored that
                self.kill(worker, KillReason.TIMEOUT, now, timeout_detail(timeout, cancellation_ignored=True), grace=0)
            else:
                self.kill(worker, KillReason.TIMEOUT, now, timeout_detail(timeout))
        return len(overdue)

    def kill_busy(self, reason: KillReason, now: float, grace: float) -> None:
        """Stop every worker that holds a job (draining past its deadline, a quick stop)."""
        for worker in list(self._all()):
            if worker.slots:
                self.kill(worker, reason, now, reason.value.replace("_", " "), grace=grace)

    def kill(self, worker: WorkerHandle, reason: KillReason, now: float, detail: str = "", grace: float = KILL_GRACE) -> None:
        """Two-stage kill of the worker's whole process group: SIGTERM now, SIGKILL after ``grace``."""
        if worker.kill_escalate_at is not None:
            return
        worker.kill_reason = worker.kill_reason or reason
        worker.kill_detail = worker.kill_detail or detail
        worker.kill_escalate_at = now + grace
        kill_group(worker.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)

    def escalate_kills(self, now: float) -> None:
        """SIGKILL what is past its grace: workers, a fork server that did not stop in time, and new
        code that did not load in time (its channel then closes: `read_control` reports it failed)."""
        for worker in self._all():
            if worker.kill_escalate_at is not None and now >= worker.kill_escalate_at:
                kill_group(worker.pid, signal.SIGKILL)
                worker.kill_escalate_at = float("inf")  # once is enough; the exit event follows
        self.succession.escalate(now)

    def next_deadline(self) -> float | None:
        """The next moment something is due here: a job's deadline or a kill's escalation."""
        workers = list(self._all())
        due = [s.deadline for w in workers if w.kill_escalate_at is None for s in w.started()]
        due += [w.kill_escalate_at for w in workers if w.kill_escalate_at is not None and w.kill_escalate_at != float("inf")]
        due += self.succession.deadlines()
        return min(due) if due else None

    def _close(self, worker: WorkerHandle) -> None:
        worker.close(self._forget)

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0, linger: float = 2.0) -> None:
        """Close every channel: idle workers run their stop hooks and exit (up to ``linger`` seconds);
        then close the fork servers' channels: each kills what is left of its workers and exits."""
        if self.succession.stopped:
            return
        for worker in list(self._all()):
            self._close(worker)
        self._forget(self.control_fd)
        self.succession.stop(timeout, linger)

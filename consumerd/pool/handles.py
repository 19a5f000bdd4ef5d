"""What the pool knows about each worker, and the events it reports to the supervisor.

The supervisor reads events (`WorkerStarted`, `WorkerResult`, `WorkerExited`, and for a reload's new
code `GenerationReady`, `GenerationFailed`, `GenerationRetired`) and asks the pool questions; the
fields of a `WorkerHandle` are the pool's own business.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from consumerd.errors import ExitCode, WorkerProtocolError
from consumerd.ipc.framing import ResultReader
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import Job, Outcome, Result, TaskOptions, Unit


class KillReason(enum.StrEnum):
    """Why the supervisor ended a worker; decides what the interrupted message's outcome was."""

    TIMEOUT = "timeout"  # the task ran past its timeout: the task's failure
    SEND_FAILED = "send_failed"  # the job could not be handed over: a crash
    PROTOCOL_ERROR = "protocol_error"  # it sent something that is not a result: a crash
    CHANNEL_CLOSED = "channel_closed"  # it closed its channel mid-task: a crash
    DRAIN_TIMEOUT = "drain_timeout"  # we are stopping: not the task's failure
    SECOND_SIGNAL = "second_signal"  # we are stopping: not the task's failure
    FATAL = "fatal"  # the daemon failed: not the task's failure


STOPPING_REASONS = frozenset({KillReason.DRAIN_TIMEOUT, KillReason.SECOND_SIGNAL, KillReason.FATAL})


class Mode(enum.StrEnum):
    """What a busy worker runs: one sync job at a time (more queued behind it), or coroutines."""

    SYNC = "sync"
    ASYNC = "async"


@dataclasses.dataclass(eq=False, slots=True)
class Slot:
    """One message a worker holds: running, or queued behind the job it runs (sync workers)."""

    seq: int
    inflight: InFlight
    unit: int  # the seq of the first message of its call: a batch's members share one
    timeout: float
    started_at: float | None = None  # None: queued, not started yet
    deadline: float = float("inf")  # when it is overdue (async: the task timeout plus the kill grace)
    timed_out: bool = False  # the kill was for this slot's timeout (its siblings were only in the way)

    def start(self, now: float, grace: float) -> None:
        """It runs from ``now``. A coroutine is cancelled by its worker at its timeout: the
        supervisor steps in only ``grace`` later, if it ignored that."""
        self.started_at = now
        self.deadline = now + self.timeout + grace


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    id: int
    pid: int
    sock: socket.socket
    reader: ResultReader = dataclasses.field(default_factory=ResultReader)  # bounded by the spec's PublishRules
    slots: dict[int, Slot] = dataclasses.field(default_factory=dict)  # by seq, in the order sent
    mode: Mode | None = None  # None while it holds nothing
    outbox: list[Unit] = dataclasses.field(default_factory=list)  # jobs to send in the next frame
    units_sent: int = 0
    tasks_done: int = 0  # calls finished (a batch is one)
    kill_reason: KillReason | None = None
    kill_detail: str = ""
    kill_escalate_at: float | None = None
    closed: bool = False
    retiring: bool = False  # beyond the pool's size: takes no new job, closed once it holds none
    over_memory: bool = False  # retiring because it reported its memory past its limits (`worker.memory`)
    reserved: Mode | None = None  # runs dry, then takes only this kind (a job of it waits)
    max_tasks: int = 0  # 0 = unlimited; at the limit the worker exits by itself
    generation: int = 0  # the generation of task code it runs (`generation`): its fork server's

    @property
    def exhausted(self) -> bool:
        """It ran its last task and exits by itself. (It takes no new one once `units_sent` reached
        the limit, see `room`, but holds its place in the pool until then: no early replacement.)"""
        return self.max_tasks > 0 and self.tasks_done >= self.max_tasks

    @property
    def live(self) -> bool:
        """Can take jobs now or later: not dying, not closed, not retiring, not at its task limit."""
        return not (self.kill_escalate_at is not None or self.closed or self.exhausted or self.retiring)

    @property
    def idle(self) -> bool:
        return not self.slots and self.live

    @property
    def busy(self) -> bool:
        return bool(self.slots)

    def retire_for_memory(self) -> None:
        """It said its memory is past its limits: it takes no new job and is closed once it holds none."""
        self.retiring = self.over_memory = True

    def units(self) -> int:
        """Calls it holds (running or queued)."""
        return len({slot.unit for slot in self.slots.values()})

    def started(self) -> list[Slot]:
        return [slot for slot in self.slots.values() if slot.started_at is not None]

    def room(self, mode: Mode, depth: int) -> int:
        """How many more calls of ``mode`` it may take now: up to ``depth`` (sync: the running one
        and those queued behind it; async: coroutines at once). None while it runs the other mode:
        a worker runs one sync task or coroutines, never both."""
        if not self.live or (self.mode is not None and self.mode is not mode):
            return 0
        room = depth - self.units()
        if self.max_tasks:
            room = min(room, self.max_tasks - self.units_sent)
        return max(0, room)

    def hold(self, jobs: list[tuple[Job, InFlight]], mode: Mode, timeout: float, now: float, grace: float) -> None:
        """One call sent to it: it starts now (a coroutine, or a sync worker that runs nothing) or
        waits behind the running one."""
        first = jobs[0][0].seq
        start = mode is Mode.ASYNC or not self.started()
        for job, inflight in jobs:
            slot = self.slots[job.seq] = Slot(job.seq, inflight, first, timeout)
            if start:
                slot.start(now, grace if mode is Mode.ASYNC else 0.0)
            inflight.worker_pid = self.pid
        self.mode = mode
        if self.reserved is mode:
            self.reserved = None
        self.units_sent += 1

    def release(self, seq: int, now: float) -> tuple[Slot, float]:
        """Its result for ``seq`` came: the slot, and how long it ran. When a sync call ends, the
        one queued behind it starts now."""
        slot = self.slots.pop(seq, None)
        if slot is None:
            raise WorkerProtocolError(f"result for job {seq} from worker {self.pid}, which holds no such job")
        started_at = now if slot.started_at is None else slot.started_at
        if not any(other.unit == slot.unit for other in self.slots.values()):
            self.tasks_done += 1
            if self.slots and self.mode is Mode.SYNC and not self.started():
                following = next(iter(self.slots.values())).unit
                for other in self.slots.values():
                    if other.unit == following:
                        other.start(now, 0.0)
        if not self.slots:
            self.mode = None
        return slot, max(0.0, now - started_at)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, forget: Callable[[Any], None]) -> None:
        """Close its channel (``forget`` drops it from the caller's selector first): an idle worker
        exits by itself when its channel closes."""
        if not self.closed:
            self.closed = True
            forget(self.sock)
            self.sock.close()


@dataclasses.dataclass(frozen=True)
class WorkerStarted:
    worker: WorkerHandle


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    worker: WorkerHandle
    inflight: InFlight
    result: Result
    ran_for: float  # seconds from its start to its result, as the supervisor saw it


@dataclasses.dataclass(frozen=True)
class Lost:
    """A message that was running when its worker died, and what that means for it."""

    inflight: InFlight
    outcome: Outcome
    ran_for: float


@dataclasses.dataclass(frozen=True)
class WorkerExited:
    worker: WorkerHandle
    lost: list[Lost]  # the messages it was running: none of them succeeded
    unstarted: list[InFlight]  # queued behind them, never started: given back untouched
    status: int  # raw wait status
    kill_reason: KillReason | None  # None: it ended by itself
    reason: str  # for people: the kill detail, or the decoded exit status

    @property
    def held(self) -> list[InFlight]:
        return [lost.inflight for lost in self.lost] + self.unstarted

    @property
    def exit_code(self) -> int:
        return os.waitstatus_to_exitcode(self.status)

    @property
    def start_hook_failed(self) -> bool:
        """It exited by itself with EX_CONFIG before taking a job: an on_worker_start hook raised."""
        return not self.held and self.kill_reason is None and self.exit_code == ExitCode.CONFIG

    @property
    def cause(self) -> str:
        """A bounded label for metrics: our kill reason, else how it ended by itself."""
        if self.kill_reason is not None and not died_by_itself(self.kill_reason, self.status):
            return self.kill_reason.value
        code = self.exit_code
        if code < 0:
            return f"signal_{signal.Signals(-code).name}" if -code in signal.valid_signals() else "signal"
        if code == 0 and self.worker.over_memory:
            return "max_memory"
        return "exit_0" if code == 0 else "exit_nonzero"


@dataclasses.dataclass(frozen=True)
class GenerationReady:
    """A reload's new task code loaded in a fork server of its own: promote it (`Pool.promote`), or
    discard it (`Pool.discard_starting`)."""

    generation: int
    tasks: dict[str, TaskOptions]
    took: float  # seconds from its start to its Ready


@dataclasses.dataclass(frozen=True)
class GenerationFailed:
    """A reload's new task code did not load (it raised, its fork server died or took too long): the
    current generation runs on."""

    generation: int
    error: str
    traceback: str = ""  # where the task code failed, when it raised


@dataclasses.dataclass(frozen=True)
class GenerationRetired:
    """A replaced generation is gone: its workers finished (or died with its fork server), and its
    fork server was told to stop."""

    generation: int
    reason: str


def timeout_detail(seconds: float, cancellation_ignored: bool = False) -> str:
    """The error a task ended at its timeout fails with: what is logged and dead-lettered."""
    return f"timeout after {seconds:g}s" + (", cancellation ignored" if cancellation_ignored else "")


def died_by_itself(kill_reason: KillReason | None, status: int) -> bool:
    """A closed channel, or a send that failed (a job queued for a worker that was already dying),
    only made us make sure it was gone: unless our SIGKILL ended it, its exit status says why."""
    mere_check = kill_reason in (KillReason.CHANNEL_CLOSED, KillReason.SEND_FAILED)
    return kill_reason is None or (mere_check and os.waitstatus_to_exitcode(status) != -signal.SIGKILL)


def outcome_of(kill_reason: KillReason | None, slot: Slot) -> Outcome:
    """What a worker's death means for one message it was running."""
    if kill_reason is KillReason.TIMEOUT:
        # Only the overdue one timed out; a coroutine beside it was in the way of the kill.
        return Outcome.TIMEOUT if slot.timed_out else Outcome.INTERRUPTED
    if kill_reason in STOPPING_REASONS:
        return Outcome.INTERRUPTED  # we stopped it: not the task's failure
    return Outcome.CRASH


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


GenerationEvent = GenerationReady | GenerationFailed | GenerationRetired
PoolEvent = WorkerStarted | WorkerResult | WorkerExited | GenerationEvent
# Every value `WorkerExited.cause` can take, so the metrics can show each from the start at zero.
EXIT_CAUSES = (*(r.value for r in KillReason if r is not KillReason.CHANNEL_CLOSED), "exit_0", "exit_nonzero", "max_memory")

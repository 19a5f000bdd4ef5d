"""What the pool knows about each worker, and the events it reports to the supervisor.

The supervisor reads events (`WorkerStarted`, `WorkerResult`, `WorkerExited`) and asks the pool
questions; the fields of a `WorkerHandle` are the pool's own business.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import socket

from .backlog import InFlight
from .channel import FrameReader, result_reader
from .protocol import Job, Outcome, Result


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


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    id: int
    pid: int
    sock: socket.socket
    reader: FrameReader[Result] = dataclasses.field(default_factory=result_reader)
    job: Job | None = None
    inflight: InFlight | None = None  # the message the job carries, as the supervisor holds it
    started_at: float = 0.0
    deadline: float = float("inf")  # started_at + the task's timeout
    tasks_done: int = 0
    kill_reason: KillReason | None = None
    kill_detail: str = ""
    kill_escalate_at: float | None = None
    closed: bool = False
    max_tasks: int = 0  # 0 = unlimited; at the limit the worker exits by itself

    @property
    def exhausted(self) -> bool:
        return self.max_tasks > 0 and self.tasks_done >= self.max_tasks

    @property
    def live(self) -> bool:
        """Can take jobs now or later: not dying, not closed, not at its task limit."""
        return not (self.kill_escalate_at is not None or self.closed or self.exhausted)

    @property
    def idle(self) -> bool:
        return self.job is None and self.live

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclasses.dataclass(frozen=True)
class WorkerStarted:
    worker: WorkerHandle


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    worker: WorkerHandle
    inflight: InFlight
    result: Result
    ran_for: float  # seconds from dispatch to result, as the supervisor saw it


@dataclasses.dataclass(frozen=True)
class WorkerExited:
    worker: WorkerHandle
    inflight: InFlight | None  # the message it was running, if any: that message did not succeed
    status: int  # raw wait status
    kill_reason: KillReason | None  # None: it ended by itself
    reason: str  # for people: the kill detail, or the decoded exit status
    ran_for: float  # seconds the interrupted job had run (0 without one)

    @property
    def exit_code(self) -> int:
        return os.waitstatus_to_exitcode(self.status)

    @property
    def start_hook_failed(self) -> bool:
        """It exited by itself with EX_CONFIG before taking a job: an on_worker_start hook raised."""
        return self.inflight is None and self.kill_reason is None and self.exit_code == 78

    @property
    def cause(self) -> str:
        """A bounded label for metrics: our kill reason, else how it ended by itself. A closed channel
        only made us make sure it was gone: its exit status tells why it ended."""
        if self.kill_reason is not None and self.kill_reason is not KillReason.CHANNEL_CLOSED:
            return self.kill_reason.value
        code = self.exit_code
        if code < 0:
            return f"signal_{signal.Signals(-code).name}" if -code in signal.valid_signals() else "signal"
        return "exit_0" if code == 0 else "exit_nonzero"

    @property
    def outcome(self) -> Outcome:
        """What the death means for the message it ran."""
        if self.kill_reason is KillReason.TIMEOUT:
            return Outcome.TIMEOUT
        if self.kill_reason in STOPPING_REASONS:
            return Outcome.INTERRUPTED  # we stopped it: not the task's failure
        return Outcome.CRASH


PoolEvent = WorkerStarted | WorkerResult | WorkerExited

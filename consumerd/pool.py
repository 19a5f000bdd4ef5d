"""Parent side of the workers: start the fork server, spawn, feed, read results, kill, reap.

The pool does mechanics only; what a result or an exit means for a message is the supervisor's call.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .channel import FrameReader, encode
from .errors import ConfigError, ConsumerdError, WorkerProtocolError
from .forkserver import MAX_PACKET
from .protocol import ForkServerSpec, Job, Result

SEND_TIMEOUT = 30.0  # seconds to hand a job to an idle worker (a 10 MB message takes milliseconds)
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to a worker's process group


class ForkServerDied(ConsumerdError):
    """The fork server exited: no worker can be replaced any more."""


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    id: int
    pid: int
    sock: socket.socket
    reader: FrameReader = dataclasses.field(default_factory=FrameReader)
    job: Job | None = None
    started_at: float = 0.0
    tasks_done: int = 0
    kill_reason: str = ""
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
    job: Job
    result: Result


@dataclasses.dataclass(frozen=True)
class WorkerExited:
    worker: WorkerHandle
    job: Job | None  # the job it was running, if any: that message did not succeed
    status: int  # raw wait status
    reason: str  # why it ended: a kill reason, or the decoded exit status

    @property
    def exit_code(self) -> int:
        return os.waitstatus_to_exitcode(self.status)


PoolEvent = WorkerStarted | WorkerResult | WorkerExited


class Pool:
    def __init__(self, spec: ForkServerSpec, size: int, forget: Callable[[socket.socket], None]) -> None:
        self.spec = spec
        self._forget = forget  # called before a channel is closed (the caller's selector drops it)
        self.size = size
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self._pending_spawns = 0
        self._ids = itertools.count(1)
        self._server: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._seq = itertools.count(1)

    # -- fork server ---------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> list[str]:
        """Start the fork server, wait until it imported the task modules; return their task names."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server = subprocess.Popen(
            [sys.executable, "-m", "consumerd.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._control = ours
        ours.send(pickle.dumps(self.spec))
        ours.settimeout(timeout)
        try:
            reply = self._recv_control()
        except (TimeoutError, ConnectionError) as exc:
            raise ForkServerDied(f"fork server did not start: {exc}") from None
        ours.settimeout(None)
        if reply[0] == "error":
            raise ConfigError(reply[1])
        return list(reply[1])

    @property
    def control_fd(self) -> int:
        assert self._control is not None
        return self._control.fileno()

    def _recv_control(self) -> tuple[Any, ...]:
        assert self._control is not None
        data, fds, _flags, _addr = socket.recv_fds(self._control, MAX_PACKET, 1)
        if not data:
            raise ForkServerDied("fork server exited")
        packet = pickle.loads(data)
        if fds:
            packet = (*packet, fds[0])
        return packet

    def read_control(self) -> list[PoolEvent]:
        """The fork server has a packet for us: a spawned worker or an exit status."""
        packet = self._recv_control()
        if packet[0] == "spawned":
            return [self._adopt(worker_id=packet[1], pid=packet[2], fd=packet[3])]
        if packet[0] == "exited":
            return self._exited(pid=packet[1], status=packet[2])
        raise ForkServerDied(f"unexpected packet from fork server: {packet[0]!r}")

    def _adopt(self, worker_id: int, pid: int, fd: int) -> WorkerStarted:
        self._pending_spawns -= 1
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)  # one syscall per send/recv on the hot path; see _send
        handle = WorkerHandle(worker_id, pid, sock, max_tasks=self.spec.max_tasks_per_child)
        self.workers[pid] = handle
        return WorkerStarted(handle)

    def _exited(self, pid: int, status: int) -> list[PoolEvent]:
        handle = self.workers.pop(pid, None)
        if handle is None:
            return []
        self._close(handle)
        _sweep_process_group(pid)
        reason = handle.kill_reason or describe_status(status)
        return [WorkerExited(handle, handle.job, status, reason)]

    # -- workers ---------------------------------------------------------------------------
    def spawn_missing(self) -> int:
        """Ask for workers until the pool has ``size`` (counting those on their way)."""
        assert self._control is not None
        live = sum(1 for w in self.workers.values() if w.live)
        missing = self.size - live - self._pending_spawns
        for _ in range(max(0, missing)):
            self._control.send(pickle.dumps(("spawn", next(self._ids))))
            self._pending_spawns += 1
        return max(0, missing)

    def retire_surplus(self) -> int:
        """After the pool shrank: close idle workers beyond ``size`` (busy ones, once they finish)."""
        live = [w for w in self.workers.values() if w.live]
        surplus = len(live) + self._pending_spawns - self.size
        retired = 0
        for worker in live:
            if retired >= surplus:
                break
            if worker.idle:
                self.retire(worker)
                retired += 1
        return retired

    def idle_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.idle]

    def busy_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.job is not None)

    def assign(self, worker: WorkerHandle, task: str, message: Any, now: float) -> Job:
        job = Job(next(self._seq), task, message)
        worker.job = job
        worker.started_at = now
        try:
            _send(worker.sock, encode(job))
        except OSError as exc:  # died, or stuck not reading: it is killed and the job fails
            self.kill(worker, f"could not send job: {type(exc).__name__}", now, grace=0)
        return job

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
            if worker.job is not None:  # it crashed, or closed its channel mid-task: make sure it is gone
                self.kill(worker, "", now, grace=0)  # the exit status will tell why
            return []
        try:
            worker.reader.feed(data)
            return [self._result(worker, frame) for frame in _drain_ready(worker.reader)]
        except WorkerProtocolError as exc:
            self.kill(worker, f"protocol error: {exc}", now, grace=0)
            return []

    def _result(self, worker: WorkerHandle, frame: Any) -> WorkerResult:
        job = worker.job
        if not isinstance(frame, Result) or job is None or frame.seq != job.seq:
            raise WorkerProtocolError(f"unexpected frame {type(frame).__name__} from worker {worker.pid}")
        worker.job = None
        worker.tasks_done += 1
        return WorkerResult(worker, job, frame)

    def kill(self, worker: WorkerHandle, reason: str, now: float, grace: float = KILL_GRACE) -> None:
        """Two-stage kill of the worker's whole process group: SIGTERM now, SIGKILL after ``grace``."""
        if worker.kill_escalate_at is not None:
            return
        worker.kill_reason = worker.kill_reason or reason
        worker.kill_escalate_at = now + grace
        _signal_group(worker.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)

    def escalate_kills(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.kill_escalate_at is not None and now >= worker.kill_escalate_at:
                _signal_group(worker.pid, signal.SIGKILL)
                worker.kill_escalate_at = float("inf")  # once is enough; the exit event follows

    def next_deadline(self) -> float | None:
        pending = [w.kill_escalate_at for w in self.workers.values() if w.kill_escalate_at not in (None, float("inf"))]
        return min(pending) if pending else None  # type: ignore[type-var]

    def retire(self, worker: WorkerHandle) -> None:
        """Close an idle worker's channel: it exits by itself (used to shrink and to stop)."""
        self._close(worker)

    def _close(self, worker: WorkerHandle) -> None:
        if not worker.closed:
            worker.closed = True
            self._forget(worker.sock)
            worker.sock.close()

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Close every channel and the fork server's; it kills what is left of its workers and exits."""
        for worker in list(self.workers.values()):
            self._close(worker)
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._server is not None:
            try:
                self._server.wait(timeout)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()


def _send(sock: socket.socket, data: bytes) -> None:
    """Send without blocking when the socket buffer takes it all (always, for small jobs); a large
    message that does not fit waits up to SEND_TIMEOUT for the idle worker to read it."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.settimeout(SEND_TIMEOUT)
        try:
            sock.sendall(memoryview(data)[sent:])
        finally:
            sock.setblocking(False)


def _drain_ready(reader: FrameReader) -> list[Any]:
    frames = list(reader.ready)
    reader.ready.clear()
    return frames


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group id was reused by someone else's process: leave it
        pass


def _sweep_process_group(pgid: int) -> None:
    """A worker is gone: whatever its task left behind in its process group goes too."""
    _signal_group(pgid, signal.SIGKILL)


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


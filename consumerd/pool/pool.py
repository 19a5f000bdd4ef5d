"""Parent side of the workers: start the fork server, spawn, feed, read results, time out, kill, reap.

The pool does mechanics only; what a result or an exit means for a message is the supervisor's call.
It owns every fact about a worker (what it runs, since when, until when, whether it is dying): the
supervisor asks (`overdue`, `next_deadline`, `running`) instead of reading a worker's fields.
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
import time
from collections.abc import Callable
from pathlib import Path

from consumerd.adapters.linux import kill_group
from consumerd.config import Settings
from consumerd.errors import ConfigError, ConsumerdError, WorkerProtocolError
from consumerd.ipc.framing import encode_units, recv_packet, send_frames
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import (
    BatchJob,
    Exited,
    ForkServerSpec,
    Job,
    PreloadFailed,
    Ready,
    Result,
    Spawn,
    Spawned,
    TaskOptions,
    Unit,
    encode_control,
)
from consumerd.pool.handles import (
    KillReason,
    Lost,
    Mode,
    PoolEvent,
    WorkerExited,
    WorkerHandle,
    WorkerResult,
    WorkerStarted,
    died_by_itself,
    outcome_of,
    timeout_detail,
)
from consumerd.pool.sandbox import hidden_from_tasks, task_environment

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to a worker's process group
# The fork server runs the consumerd package the supervisor runs, from its own directory, in
# isolated mode (-I: no PYTHON* variables, no working directory on sys.path).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); from consumerd.worker.forkserver import main; sys.exit(main())"


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
    )


@dataclasses.dataclass(frozen=True)
class RunningJob:
    pid: int
    inflight: InFlight
    started_at: float  # monotonic


class ForkServerDied(ConsumerdError):
    """The fork server exited or broke the protocol: no worker can be replaced any more."""


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
    def start(self, timeout: float = 60.0) -> dict[str, TaskOptions]:
        """Start the fork server, wait until it imported the task modules; return their tasks' options."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=task_environment(os.environ, dict(self.spec.environment)),  # no secrets for task code
        )
        theirs.close()
        self._control = ours
        ours.send(pickle.dumps(self.spec))
        ours.settimeout(timeout)
        try:
            reply, _ = self._recv_control()
        except (TimeoutError, ConnectionError) as exc:
            raise ForkServerDied(f"fork server did not start: {exc}") from None
        ours.settimeout(None)
        if isinstance(reply, PreloadFailed):
            raise ConfigError(reply.error)
        if not isinstance(reply, Ready):
            raise ForkServerDied(f"fork server sent {type(reply).__name__} before Ready")
        return dict(reply.tasks)

    @property
    def control_fd(self) -> int:
        assert self._control is not None
        return self._control.fileno()

    def _recv_control(self) -> tuple[object, int | None]:
        """One control packet and the descriptor that came with it, if any."""
        assert self._control is not None
        try:
            return recv_packet(self._control)
        except WorkerProtocolError as exc:
            raise ForkServerDied(str(exc)) from None

    def read_control(self, now: float) -> list[PoolEvent]:
        """The fork server has a packet for us: a spawned worker or an exit status."""
        packet, fd = self._recv_control()
        if isinstance(packet, Spawned) and fd is not None:
            return [self._adopt(packet.worker_id, packet.pid, fd)]
        if fd is not None:
            os.close(fd)
        if isinstance(packet, Exited):
            return self._exited(packet.pid, packet.status, now)
        raise ForkServerDied(f"unexpected packet from the fork server: {type(packet).__name__}")

    def _adopt(self, worker_id: int, pid: int, fd: int) -> WorkerStarted:
        self._pending_spawns -= 1
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ForkServerDied(f"the fork server sent a descriptor that is not a socket: {exc}") from None
        sock.setblocking(False)  # one syscall per send/recv on the hot path; see _send
        handle = WorkerHandle(worker_id, pid, sock, max_tasks=self.spec.max_tasks_per_child)
        self.workers[pid] = handle
        return WorkerStarted(handle)

    def _exited(self, pid: int, status: int, now: float) -> list[PoolEvent]:
        handle = self.workers.pop(pid, None)
        if handle is None:
            return []
        self._close(handle)
        _sweep_process_group(pid)
        reason = describe_status(status) if died_by_itself(handle.kill_reason, status) else (handle.kill_detail or describe_status(status))
        lost = [Lost(s.inflight, outcome_of(handle.kill_reason, s), now - s.started_at) for s in handle.started()]  # type: ignore[operator]
        unstarted = [s.inflight for s in handle.slots.values() if s.started_at is None]
        handle.slots.clear()
        return [WorkerExited(handle, lost, unstarted, status, handle.kill_reason, reason)]

    # -- workers ---------------------------------------------------------------------------
    def spawn_missing(self) -> int:
        """Ask for workers until the pool has ``size`` (counting those on their way)."""
        assert self._control is not None
        live = sum(1 for w in self.workers.values() if w.live)
        missing = self.size - live - self._pending_spawns
        for _ in range(max(0, missing)):
            self._control.send(encode_control(Spawn(next(self._ids))))
            self._pending_spawns += 1
        return max(0, missing)

    def retire_surplus(self) -> int:
        """After the pool shrank: close idle workers beyond ``size``; busy ones take no new job and
        are closed once they hold none (`read_worker`)."""
        live = [w for w in self.workers.values() if w.live]
        surplus = len(live) + self._pending_spawns - self.size
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
        """The worker with the most room for a call of ``mode``, up to ``depth`` calls deep. A busy
        sync worker whose queue is still half full is passed over: it is refilled later, many jobs in
        one frame. With ``reserve``, when none can take it, the least busy worker of the other kind is
        left to run dry and then takes only ``mode``."""
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
        return len(self.workers)

    def running(self) -> list[InFlight]:
        """The messages workers are running now (not those queued behind them)."""
        return [job.inflight for job in self.jobs()]

    def queued(self) -> list[InFlight]:
        """Messages sent to a worker that has not started them yet."""
        return [s.inflight for w in self.workers.values() for s in w.slots.values() if s.started_at is None]

    def jobs(self) -> list[RunningJob]:
        """What runs now, worker by worker (for `consumerd status`)."""
        return [RunningJob(w.pid, s.inflight, s.started_at) for w in self.workers.values() for s in w.started()]  # type: ignore[arg-type]

    def busy_count(self) -> int:
        """Messages the workers hold, running or queued."""
        return sum(len(w.slots) for w in self.workers.values())

    def assign(self, worker: WorkerHandle, unit: list[InFlight], mode: Mode, timeout: float, now: float, batch: bool = False) -> None:
        """Add one call (one message, or a batch's) to the worker's next frame (`flush` sends it)."""
        jobs = tuple(Job(next(self._seq), inflight.task, inflight.message, timeout, inflight.attempt) for inflight in unit)
        worker.hold(list(zip(jobs, unit, strict=True)), mode, timeout, now, KILL_GRACE)
        worker.outbox.append(BatchJob(unit[0].task, jobs, timeout) if batch else jobs[0])

    def flush(self, now: float) -> None:
        """Send each worker the jobs assigned to it since the last flush, in one frame."""
        for worker in self.workers.values():
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
        return WorkerResult(worker, slot.inflight, result, ran_for)

    # -- timeouts and kills ------------------------------------------------------------------
    def overdue(self, now: float) -> list[WorkerHandle]:
        """Workers running a job past its deadline that are not being killed yet."""
        return [w for w in self.workers.values() if w.kill_escalate_at is None and any(now >= s.deadline for s in w.started())]

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
        for worker in list(self.workers.values()):
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
        for worker in self.workers.values():
            if worker.kill_escalate_at is not None and now >= worker.kill_escalate_at:
                kill_group(worker.pid, signal.SIGKILL)
                worker.kill_escalate_at = float("inf")  # once is enough; the exit event follows

    def next_deadline(self) -> float | None:
        """The next moment something is due here: a job's deadline or a kill's escalation."""
        due = [s.deadline for w in self.workers.values() if w.kill_escalate_at is None for s in w.started()]
        due += [w.kill_escalate_at for w in self.workers.values() if w.kill_escalate_at is not None and w.kill_escalate_at != float("inf")]
        return min(due) if due else None

    def _close(self, worker: WorkerHandle) -> None:
        if not worker.closed:
            worker.closed = True
            self._forget(worker.sock)
            worker.sock.close()

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0, linger: float = 2.0) -> None:
        """Close every channel: idle workers run their stop hooks and exit (up to ``linger`` seconds);
        then close the fork server's channel: it kills what is left of its workers and exits."""
        for worker in list(self.workers.values()):
            self._close(worker)
        self._await_exits(linger)
        if self._control is not None:
            self._forget(self._control)
            self._control.close()
            self._control = None
        if self._server is not None:
            try:
                self._server.wait(timeout)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()

    def _await_exits(self, linger: float) -> None:
        if self._control is None or not self.workers:
            return
        deadline = time.monotonic() + linger
        try:
            while self.workers and (remaining := deadline - time.monotonic()) > 0:
                self._control.settimeout(remaining)
                for event in self.read_control(time.monotonic()):
                    if isinstance(event, WorkerStarted):  # spawned just before the stop: it exits too
                        self._close(event.worker)
        except (OSError, ConsumerdError):
            pass  # the fork server is gone, or the time is up: it kills the rest


def _sweep_process_group(pgid: int) -> None:
    """A worker is gone: whatever its task left behind in its process group goes too."""
    kill_group(pgid, signal.SIGKILL)


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"

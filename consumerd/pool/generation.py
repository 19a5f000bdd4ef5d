"""One generation of task code: a fork server, the code it loaded, and the workers forked from it.

The daemon runs one generation, and a second beside it while a reload's new code loads or while a
replaced one's workers finish what they run (the `Pool` decides which takes new jobs). This is the
parent side of one fork server: start it by exec (never by fork: the supervisor may hold gRPC
channels by then), read its packets, ask it for workers, adopt their channels, turn their exit
statuses into `WorkerExited` events, and stop it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from consumerd.adapters.linux import kill_group
from consumerd.errors import ConsumerdError, WorkerProtocolError
from consumerd.ipc.framing import ResultReader, recv_packet
from consumerd.ipc.records import CodeFile, Exited, ForkServerSpec, PreloadFailed, Ready, Spawn, Spawned, TaskOptions, encode_control
from consumerd.pool.handles import (
    GenerationFailed,
    GenerationReady,
    Lost,
    PoolEvent,
    WorkerExited,
    WorkerHandle,
    WorkerStarted,
    describe_status,
    died_by_itself,
    outcome_of,
)
from consumerd.pool.sandbox import task_environment

# The fork server runs the consumerd package the supervisor runs, from its own directory, in
# isolated mode (-I: no PYTHON* variables, no working directory on sys.path).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); from consumerd.worker.forkserver import main; sys.exit(main())"


class ForkServerDied(ConsumerdError):
    """The fork server exited or broke the protocol: no worker can be replaced any more."""


class Stage(enum.StrEnum):
    STARTING = "starting"  # importing the task code; no workers yet
    CURRENT = "current"  # new jobs go to its workers
    FINISHING = "finishing"  # replaced: its workers finish what they run and exit, then it stops


class ServerProcess(Protocol):
    """What the pool uses of a fork server's process (a `subprocess.Popen`)."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Launch = Callable[[ForkServerSpec], tuple[ServerProcess, socket.socket]]


def launch(spec: ForkServerSpec) -> tuple[ServerProcess, socket.socket]:
    """Exec a fork server for ``spec`` (sent as its first packet); it and our end of its channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=task_environment(os.environ, dict(spec.environment)),  # no secrets for task code
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.send(pickle.dumps(spec))
    return server, ours


@dataclasses.dataclass(frozen=True)
class GenerationStatus:
    """One generation for `consumerd status`: which workers run its code."""

    number: int
    stage: Stage
    workers: tuple[int, ...]  # pids
    busy: int  # of those, the ones that hold a job
    age: float  # seconds since its fork server started


@dataclasses.dataclass(eq=False)
class Generation:
    number: int
    spec: ForkServerSpec
    server: ServerProcess
    control: socket.socket
    started_at: float  # monotonic: when its fork server was started
    deadline: float = float("inf")  # a starting one that is not ready by then is stopped
    stage: Stage = Stage.STARTING
    ready: bool = False  # its code loaded (Ready came)
    tasks: dict[str, TaskOptions] = dataclasses.field(default_factory=dict)
    files: tuple[CodeFile, ...] = ()  # where its code came from, as it was then
    workers: dict[int, WorkerHandle] = dataclasses.field(default_factory=dict)  # by pid
    pending_spawns: int = 0
    failure: str = ""  # why we stopped it while it was starting: what its GenerationFailed says
    closed: bool = False

    def fileno(self) -> int:
        return self.control.fileno()

    def holds(self) -> bool:
        """It still has workers, or workers on their way."""
        return bool(self.workers) or self.pending_spawns > 0

    def recv(self) -> tuple[object, int | None]:
        """One control packet and the descriptor that came with it, if any."""
        try:
            return recv_packet(self.control)
        except (WorkerProtocolError, OSError) as exc:
            raise ForkServerDied(str(exc) or type(exc).__name__) from None

    def await_ready(self, timeout: float) -> object:
        """Block until the fork server imported the code (start-up, when nothing else runs yet):
        its `Ready`, or `PreloadFailed`."""
        self.control.settimeout(timeout)
        try:
            reply, fd = self.recv()
        except ForkServerDied as exc:
            raise ForkServerDied(f"fork server did not start: {exc}") from None
        finally:
            self.control.settimeout(None)
        if fd is not None:
            os.close(fd)
        if isinstance(reply, Ready):
            self.loaded(reply)
        return reply

    def loaded(self, ready: Ready) -> None:
        self.ready = True
        self.tasks = dict(ready.tasks)
        self.files = ready.files

    def read(self, now: float, close: Callable[[WorkerHandle], None]) -> list[PoolEvent]:
        """Its fork server sent a packet: a worker forked or exited, or (while starting) the code
        loaded or failed to. ForkServerDied when it is gone or broke the protocol."""
        packet, fd = self.recv()
        if isinstance(packet, Spawned) and fd is not None and self.stage is not Stage.STARTING:
            handle = self.adopt(packet.worker_id, packet.pid, fd)
            if self.stage is Stage.CURRENT:
                return [WorkerStarted(handle)]
            handle.retiring = True  # asked for just before its generation was replaced: it exits at once
            close(handle)
            return []
        if fd is not None:
            os.close(fd)
        if self.stage is Stage.STARTING:
            return [self._startup_reply(packet, now)]
        if isinstance(packet, Exited):
            event = self.exited(packet.pid, packet.status, now, close)
            return [event] if event is not None else []
        raise ForkServerDied(f"unexpected packet from the fork server: {type(packet).__name__}")

    def _startup_reply(self, packet: object, now: float) -> PoolEvent:
        if isinstance(packet, Ready):
            self.loaded(packet)
            return GenerationReady(self.number, dict(packet.tasks), now - self.started_at)
        if isinstance(packet, PreloadFailed):
            return GenerationFailed(self.number, packet.error, packet.traceback)
        raise ForkServerDied(f"the new fork server sent {type(packet).__name__} before Ready")

    def spawn(self, worker_id: int) -> None:
        """Ask the fork server for one more worker (it comes as a Spawned packet)."""
        self.control.send(encode_control(Spawn(worker_id)))
        self.pending_spawns += 1

    def adopt(self, worker_id: int, pid: int, fd: int) -> WorkerHandle:
        self.pending_spawns -= 1
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ForkServerDied(f"the fork server sent a descriptor that is not a socket: {exc}") from None
        sock.setblocking(False)  # one syscall per send/recv on the hot path; see _send
        handle = WorkerHandle(
            worker_id, pid, sock, ResultReader(self.spec.publish), max_tasks=self.spec.max_tasks_per_child, generation=self.number
        )
        self.workers[pid] = handle
        return handle

    def exited(self, pid: int, status: int, now: float, close: Callable[[WorkerHandle], None], reason: str = "") -> WorkerExited | None:
        """The worker ``pid`` ended with ``status``: what it held, and why (``reason`` overrides)."""
        handle = self.workers.pop(pid, None)
        if handle is None:
            return None
        close(handle)
        kill_group(pid, signal.SIGKILL)  # whatever its task left behind in its process group goes too
        if not reason:
            by_itself = died_by_itself(handle.kill_reason, status)
            reason = describe_status(status) if by_itself else (handle.kill_detail or describe_status(status))
        lost = [Lost(s.inflight, outcome_of(handle.kill_reason, s), now - s.started_at) for s in handle.started()]  # type: ignore[operator]
        unstarted = [s.inflight for s in handle.slots.values() if s.started_at is None]
        handle.slots.clear()
        return WorkerExited(handle, lost, unstarted, status, handle.kill_reason, reason)

    def lost_all(self, now: float, close: Callable[[WorkerHandle], None], reason: str) -> list[WorkerExited]:
        """Its fork server died, and PR_SET_PDEATHSIG killed every worker with it: report each."""
        events = [self.exited(pid, signal.SIGKILL, now, close, reason) for pid in list(self.workers)]
        self.pending_spawns = 0
        return [event for event in events if event is not None]

    def close(self) -> None:
        """Close its channel: the fork server kills what is left of its workers and exits."""
        if not self.closed:
            self.closed = True
            self.control.close()

    def status(self, now: float) -> GenerationStatus:
        busy = sum(1 for w in self.workers.values() if w.slots)
        return GenerationStatus(self.number, self.stage, tuple(self.workers), busy, max(0.0, now - self.started_at))

"""The pool across generations of task code, with the fork servers played by the test.

Each fork server is a socketpair the test answers on (Ready, Spawned with a real channel, Exited):
no process, no clock of its own. What a reload must keep: old workers finish what they run and get
nothing new, old and new together never exceed the pool's size, and new code that fails to load, or
an old fork server that dies, never takes the daemon down.
"""

from __future__ import annotations

import itertools
import select
import socket

import pytest

from consumerd.ipc.framing import encode_result
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import (
    CodeFile,
    Exited,
    ForkServerSpec,
    Outcome,
    PreloadFailed,
    Ready,
    Result,
    Spawned,
    TaskOptions,
    decode_control,
    encode_control,
)
from consumerd.message import Message
from consumerd.pool.generation import Stage
from consumerd.pool.handles import GenerationFailed, GenerationReady, GenerationRetired, Mode, WorkerExited, WorkerResult, WorkerStarted
from consumerd.pool.pool import ForkServerDied, Pool

SPEC = ForkServerSpec(sys_path=(), modules=("tasks",), log_format="json", log_level="info", max_tasks_per_child=0)
TASKS = (("t", TaskOptions()),)
KILLED = 9  # the wait status of a process SIGKILL ended


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode or 0


class ForkServers:
    """What the pool launches: each launch gives the test the fork server's end of the channel."""

    def __init__(self) -> None:
        self.ends: list[socket.socket] = []
        self.processes: list[FakeProcess] = []
        self.workers: dict[int, socket.socket] = {}  # pid -> the worker's end of its channel
        self._pids = itertools.count(1000)

    def launch(self, spec: ForkServerSpec) -> tuple[FakeProcess, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        self.ends.append(theirs)
        self.processes.append(FakeProcess(900 + len(self.processes)))
        if not self.processes[1:]:  # the first one: `Pool.start` waits for its Ready
            theirs.send(encode_control(Ready(TASKS, (CodeFile("/app/tasks.py", 1, 10),))))
        return self.processes[-1], ours

    def send(self, server: int, packet: object, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.ends[server], [encode_control(packet)], fds)  # type: ignore[arg-type]
        else:
            self.ends[server].send(encode_control(packet))  # type: ignore[arg-type]

    def serve_spawns(self, server: int) -> list[int]:
        """Answer every Spawn the pool sent to ``server`` with a worker: their pids."""
        pids = []
        while True:
            try:
                request = decode_control(self.ends[server].recv(65536))
            except BlockingIOError:
                return pids
            pid = next(self._pids)
            ours, theirs = socket.socketpair()
            self.workers[pid] = theirs
            self.send(server, Spawned(request.worker_id, pid), [ours.fileno()])  # type: ignore[union-attr]
            ours.close()
            pids.append(pid)

    def spawned(self, server: int, worker_id: int, pid: int) -> None:
        """A worker forked (for a Spawn the test did not answer through `serve_spawns`)."""
        ours, theirs = socket.socketpair()
        self.workers[pid] = theirs
        self.send(server, Spawned(worker_id, pid), [ours.fileno()])
        ours.close()

    def spawns_asked(self, server: int) -> int:
        n = 0
        while True:
            try:
                self.ends[server].recv(65536)
            except BlockingIOError:
                return n
            n += 1

    def channel_closed(self, server: int) -> bool:
        try:
            return self.ends[server].recv(65536) == b""
        except BlockingIOError:
            return False


def read_all(pool: Pool, now: float = 0.0) -> list:
    events: list = []
    while select.select([pool.control_fd], [], [], 0)[0]:
        events += pool.read_control(now)
    return events


def message(mid: str) -> InFlight:
    return InFlight(f"ack-{mid}", Message(mid, b"", {}, None, None, "", "projects/p/subscriptions/s"), "t", 1, 0.0)


@pytest.fixture
def servers() -> ForkServers:
    return ForkServers()


def started_pool(servers: ForkServers, size: int) -> tuple[Pool, list]:
    pool = Pool(SPEC, size, forget=lambda _sock: None, launch=servers.launch)
    assert pool.start() == dict(TASKS)
    pool.spawn_missing()
    servers.serve_spawns(0)
    workers = [e.worker for e in read_all(pool) if isinstance(e, WorkerStarted)]
    assert len(workers) == size and pool.generation == 1 and pool.code_files() == (CodeFile("/app/tasks.py", 1, 10),)
    return pool, workers


def test_new_code_takes_new_jobs_once_ready_while_old_workers_finish_and_never_more_than_the_size(servers):
    pool, (a, b, c) = started_pool(servers, 3)
    pool.assign(a, [message("long")], Mode.SYNC, 60.0, 0.0)
    pool.flush(0.0)

    assert pool.begin(SPEC, now=1.0) == 2
    for worker in (b, c):
        pool.assign(worker, [message(f"on-{worker.pid}")], Mode.SYNC, 60.0, 1.0)
    assert pool.pick(Mode.SYNC, depth=8) is None, "while new code loads, nothing is queued behind a running job"
    for worker in (b, c):
        worker.release(next(iter(worker.slots)), 1.1)  # they finished (their results read)

    servers.send(1, Ready(TASKS, (CodeFile("/app/tasks.py", 2, 12),)))
    [ready] = read_all(pool, 1.5)
    assert isinstance(ready, GenerationReady) and ready.generation == 2 and ready.took == 0.5
    assert pool.promote(1.5) == []
    assert b.closed and c.closed and not a.closed and not a.live, "idle old workers close, the busy one finishes"
    assert servers.spawns_asked(1) == 2, "the old busy worker holds its place: 2 new + 1 old = the size"
    assert pool.code_files() == (CodeFile("/app/tasks.py", 2, 12),) and pool.generation == 2

    servers.spawned(1, 99, 2001)
    [new] = [e.worker for e in read_all(pool) if isinstance(e, WorkerStarted)]
    assert new.generation == 2 and pool.pick(Mode.SYNC, depth=2) is new, "new jobs go to new workers only"
    stages = {g.number: (g.stage, g.busy) for g in pool.generations(2.0)}
    assert stages == {2: (Stage.CURRENT, 0), 1: (Stage.FINISHING, 1)}
    assert [j.generation for j in pool.jobs()] == [1]

    for pid in (b.pid, c.pid):
        servers.send(0, Exited(pid, 0))
    exits = read_all(pool, 3.0)
    assert [type(e) for e in exits] == [WorkerExited, WorkerExited] and not any(e.held for e in exits)

    servers.workers[a.pid].send(encode_result(Result(next(iter(a.slots)), Outcome.SUCCESS, 20.0)))
    [result] = pool.read_worker(a, 21.0)
    assert isinstance(result, WorkerResult) and a.closed, "it finished on the old code, then its channel closed"
    pool.spawn_missing()
    assert servers.spawns_asked(1) == 1, "its place goes to a new worker"
    servers.send(0, Exited(a.pid, 0))
    exited, retired = read_all(pool, 22.0)
    assert isinstance(exited, WorkerExited) and not exited.held
    assert retired == GenerationRetired(1, "its workers finished")
    assert servers.channel_closed(0), "the old fork server is told to stop once its last worker is gone"
    pool.escalate_kills(22.0 + 6)
    assert servers.processes[0].killed, "and killed if it does not exit in time"


def test_new_code_that_fails_to_import_changes_nothing(servers):
    pool, workers = started_pool(servers, 2)
    pool.begin(SPEC, now=1.0)
    servers.send(1, PreloadFailed("tasks.modules: importing 'tasks' failed: SyntaxError", 'File "/app/tasks.py", line 3\nSyntaxError'))
    [failed] = read_all(pool, 1.2)
    assert failed == GenerationFailed(
        2, "tasks.modules: importing 'tasks' failed: SyntaxError", 'File "/app/tasks.py", line 3\nSyntaxError'
    )
    assert servers.channel_closed(1)
    assert pool.generation == 1 and all(w.live for w in workers) and pool.pick(Mode.SYNC, depth=8) is not None
    assert [g.stage for g in pool.generations(2.0)] == [Stage.CURRENT]


def test_new_code_whose_fork_server_dies_or_takes_too_long_fails(servers):
    pool, _ = started_pool(servers, 1)
    pool.begin(SPEC, now=1.0)
    servers.ends[1].close()  # it died while importing
    [died] = read_all(pool, 2.0)
    assert isinstance(died, GenerationFailed) and "exited before it was ready" in died.error

    servers.processes[1].returncode = 1
    pool.escalate_kills(2.0)  # reaped: nothing is due for it any more
    pool.begin(SPEC, now=10.0, timeout=5.0)
    assert pool.next_deadline() == 15.0
    pool.escalate_kills(15.0)
    assert servers.processes[2].killed
    servers.ends[2].close()  # the kill ended it
    [slow] = read_all(pool, 15.1)
    assert isinstance(slow, GenerationFailed) and slow.error == "the new code did not load within 5s"
    assert pool.generation == 1


def test_newer_code_supersedes_code_still_loading(servers):
    pool, _ = started_pool(servers, 1)
    pool.begin(SPEC, now=1.0)
    assert pool.begin(SPEC, now=1.5) == 3
    assert servers.processes[1].killed and servers.channel_closed(1)
    servers.send(2, Ready(TASKS))
    assert [e.generation for e in read_all(pool)] == [3]


def test_an_old_fork_server_that_dies_loses_its_workers_not_the_daemon_but_the_current_one_is_fatal(servers):
    pool, (a, b) = started_pool(servers, 2)
    pool.assign(a, [message("running")], Mode.SYNC, 60.0, 0.0)
    pool.begin(SPEC, now=1.0)
    servers.send(1, Ready(TASKS))
    read_all(pool)
    pool.promote(1.0)
    servers.spawned(0, 7, 1999)  # asked for before the switch
    assert read_all(pool) == [] and pool.generations(1.0)[1].workers == (a.pid, b.pid, 1999)
    servers.ends[0].close()  # the old fork server died: its workers with it (PR_SET_PDEATHSIG)
    events = read_all(pool, 2.0)
    lost = [e for e in events if isinstance(e, WorkerExited) and e.lost]
    assert [e.worker.pid for e in lost] == [a.pid] and lost[0].lost[0].outcome is Outcome.CRASH
    assert isinstance(events[-1], GenerationRetired) and "its fork server died" in events[-1].reason
    assert servers.processes[0].killed and pool.busy_count() == 0

    servers.ends[1].close()
    with pytest.raises(ForkServerDied):
        read_all(pool)


def test_stopping_the_pool_stops_every_fork_server_and_new_code_still_loading(servers):
    pool, (a,) = started_pool(servers, 1)
    pool.begin(SPEC, now=1.0)
    pool.stop(timeout=0.1, linger=0.05)
    assert servers.processes[1].killed and servers.channel_closed(0) and a.closed
    pool.stop()  # twice is harmless

"""The pool, fork server and workers as real processes (no Pub/Sub involved)."""

from __future__ import annotations

import datetime
import os
import select
import sys
import time

import pytest

from consumerd.ipc.held import InFlight
from consumerd.ipc.records import ForkServerSpec, Outcome
from consumerd.message import Message
from consumerd.pool.handles import Mode
from consumerd.pool.pool import KillReason, Pool, WorkerExited, WorkerResult, WorkerStarted

pytestmark = pytest.mark.integration


def message(mid: str, data: bytes = b"") -> Message:
    return Message(mid, data, {}, datetime.datetime.now(datetime.UTC), None, "", "projects/p/subscriptions/s")


@pytest.fixture
def pool(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LEDGER_DIR", str(tmp_path))
    pools = []

    def make(size=2, max_tasks=0):
        spec = ForkServerSpec(tuple(sys.path), ("tests.support.tasks",), "json", "warning", max_tasks)
        p = Pool(spec, size, forget=lambda sock: None)
        names = p.start()
        assert "ok" in names and "sleep" in names
        p.spawn_missing()
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.stop()


def job(pool: Pool, worker, task: str, msg: Message, timeout: float = 60.0) -> InFlight:
    inflight = InFlight(f"ack-{msg.message_id}", msg, task, 1, time.monotonic())
    pool.assign(worker, [inflight], Mode.SYNC, timeout, time.monotonic())
    pool.flush(time.monotonic())
    return inflight


def pump(pool: Pool, until, timeout: float = 20.0) -> list:
    """Read pool events until ``until(events)`` holds."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        fds = {pool.control_fd: None, **{w.sock.fileno(): w for w in pool.workers.values() if not w.closed}}
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            worker = fds[fd]
            events += pool.read_control(time.monotonic()) if worker is None else pool.read_worker(worker, time.monotonic())
        pool.escalate_kills(time.monotonic())
    return events


def started(n):
    return lambda events: sum(isinstance(e, WorkerStarted) for e in events) >= n


def of_type(kind):
    return lambda events: any(isinstance(e, kind) for e in events)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_start_in_their_own_process_groups_and_run_jobs(pool):
    p = pool(size=2)
    pump(p, started(2))
    for worker in p.workers.values():
        assert os.getpgid(worker.pid) == worker.pid
    worker = p.idle_workers()[0]
    inflight = job(p, worker, "ok", message("m1"))
    [result] = [e for e in pump(p, of_type(WorkerResult)) if isinstance(e, WorkerResult)]
    assert result.inflight is inflight and result.result.outcome is Outcome.SUCCESS and worker.idle


def test_a_crashing_worker_reports_its_exit_status_and_job(pool):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    inflight = job(p, worker, "exit_once", message("m2"))
    [exited] = [e for e in pump(p, of_type(WorkerExited)) if isinstance(e, WorkerExited)]
    assert (
        exited.lost[0].inflight is inflight
        and exited.lost[0].outcome is Outcome.CRASH
        and exited.reason == "exited with code 1"
        and exited.exit_code == 1
    )
    assert p.spawn_missing() == 1  # the pool asks for a replacement


def test_kill_is_two_stage_and_names_the_reason(pool):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    job(p, worker, "sleep", message("m3", b'{"seconds": 600}'), timeout=0.2)
    time.sleep(0.3)
    assert p.overdue(time.monotonic()) == [worker]
    p.kill_overdue(time.monotonic())
    assert p.overdue(time.monotonic()) == []  # being killed: not overdue twice
    [exited] = [e for e in pump(p, of_type(WorkerExited)) if isinstance(e, WorkerExited)]
    assert exited.reason == "timeout after 0.2s" and exited.exit_code == 143  # TaskCancelled raised in the task by the SIGTERM
    assert exited.kill_reason is KillReason.TIMEOUT and exited.lost[0].outcome is Outcome.TIMEOUT


def test_max_tasks_per_child_1_forks_a_fresh_worker_per_job(pool):
    p = pool(size=1, max_tasks=1)
    pids = []
    for i in range(3):
        pump(p, lambda events: bool(p.idle_workers()))
        [worker] = p.idle_workers()
        pids.append(worker.pid)
        job(p, worker, "ok", message(f"m{i}"))
        assert worker.busy and worker.room(Mode.SYNC, 2) == 0  # one task per child: nothing queued behind it
        assert p.spawn_missing() == 0  # its replacement is forked once it is done, not while it runs
        pump(p, of_type(WorkerResult))
        assert worker.exhausted and not worker.idle
        p.spawn_missing()
    assert len(set(pids)) == 3


def test_stopping_the_pool_kills_workers_mid_task(pool):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    job(p, worker, "sleep", message("m4", b'{"seconds": 600}'))
    p.stop()
    deadline = time.monotonic() + 10
    while alive(worker.pid):
        assert time.monotonic() < deadline, "worker outlived the fork server"
        time.sleep(0.05)


def test_a_worker_runs_queued_jobs_in_order_and_one_frame_carries_them_all(pool):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    now = time.monotonic()
    units = [[InFlight(f"ack-q{i}", message(f"q{i}"), "ok", 1, now)] for i in range(4)]
    for unit in units:
        p.assign(worker, unit, Mode.SYNC, 60.0, now)
    assert len(worker.outbox) == 4 and len(worker.started()) == 1  # the rest queue behind the first
    p.flush(now)
    results = [e for e in pump(p, lambda ev: sum(isinstance(e, WorkerResult) for e in ev) >= 4) if isinstance(e, WorkerResult)]
    assert [r.inflight.message.message_id for r in results] == ["q0", "q1", "q2", "q3"]
    assert worker.idle and worker.tasks_done == 4


def test_a_worker_that_dies_gives_its_queued_jobs_back_untouched(pool):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    now = time.monotonic()
    crashing = InFlight("ack-c", message("c"), "always_crash", 1, now)
    queued = InFlight("ack-w", message("w"), "ok", 1, now)
    p.assign(worker, [crashing], Mode.SYNC, 60.0, now)
    p.assign(worker, [queued], Mode.SYNC, 60.0, now)
    p.flush(now)
    [exited] = [e for e in pump(p, of_type(WorkerExited)) if isinstance(e, WorkerExited)]
    assert [(lost.inflight, lost.outcome) for lost in exited.lost] == [(crashing, Outcome.CRASH)]
    assert exited.unstarted == [queued]  # never started: not failed, no attempt used


def test_coroutines_run_together_on_one_worker(pool, tmp_path):
    p = pool(size=1)
    pump(p, started(1))
    [worker] = p.idle_workers()
    now = time.monotonic()
    for i in range(20):
        msg = Message(f"a{i}", b"", {"seconds": "1"}, datetime.datetime.now(datetime.UTC), None, "", "projects/p/subscriptions/s")
        p.assign(worker, [InFlight(f"ack-a{i}", msg, "aio_sleep", 1, now)], Mode.ASYNC, 60.0, now)
    assert len(worker.started()) == 20 and worker.room(Mode.SYNC, 2) == 0 and worker.room(Mode.ASYNC, 25) == 5
    p.flush(now)
    results = [e for e in pump(p, lambda ev: sum(isinstance(e, WorkerResult) for e in ev) >= 20) if isinstance(e, WorkerResult)]
    assert {r.result.outcome for r in results} == {Outcome.SUCCESS}
    running = peak = 0  # from the tasks' own ledger: all 20 had started before the first ended
    for line in (tmp_path / "ledger.txt").read_text().splitlines():
        running += {"start": 1, "done": -1}[line.split()[0]]
        peak = max(peak, running)
    assert peak == 20
    assert worker.mode is None and worker.idle

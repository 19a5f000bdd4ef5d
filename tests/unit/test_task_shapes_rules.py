"""Async and batch tasks, pure parts: batch fates, slots on a worker, pipelined starts, batch forming."""

from __future__ import annotations

import socket

import pytest

from consumerd import BatchResult, Reject, Retry
from consumerd.errors import WorkerProtocolError
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import Job, Outcome
from consumerd.message import Message
from consumerd.policy.backlog import Backlog
from consumerd.pool.handles import KillReason, Mode, Slot, WorkerHandle, outcome_of
from consumerd.worker.batch import fates
from consumerd.worker.registry import REGISTRY, task


def msg(i: int, **attributes: str) -> Message:
    return Message(f"m{i}", b"", attributes, None, None, "", "s")


def inflight(i: int, task: str = "t") -> InFlight:
    return InFlight(f"a{i}", msg(i), task, 1, 0.0)


# -- what a batch task's return value means --------------------------------------------------------


def test_none_acks_the_whole_batch():
    out, problems = fates(None, [msg(1), msg(2)])
    assert [f.outcome for f in out] == [Outcome.SUCCESS, Outcome.SUCCESS] and problems == []


def test_a_batch_result_fails_only_the_messages_it_names():
    batch = [msg(1), msg(2), msg(3), msg(4)]
    result = BatchResult()
    result.retry(batch[0], after=30)
    result.reject(batch[1], "bad row")
    result.fail(batch[2], ValueError("db said no"))
    out, problems = fates(result, batch)
    assert [f.outcome for f in out] == [Outcome.RETRY, Outcome.REJECT, Outcome.ERROR, Outcome.SUCCESS]
    assert out[0].retry_after == 30 and out[1].error == "Reject: bad row" and out[2].error == "ValueError: db said no"
    assert problems == []


def test_a_plain_mapping_works_too_and_bad_entries_are_clear_errors():
    out, problems = fates({"m2": Retry(5), "nope": ValueError(), "m1": "not an exception"}, [msg(1), msg(2)])
    assert [f.outcome for f in out] == [Outcome.ERROR, Outcome.RETRY]
    assert "must be an exception" in out[0].error
    assert any("'nope' is not in this batch" in p for p in problems)


@pytest.mark.parametrize("returned", [42, "ok", ["m1"], True])
def test_a_return_value_of_the_wrong_type_fails_the_batch_with_a_clear_error(returned):
    out, problems = fates(returned, [msg(1), msg(2)])
    assert {f.outcome for f in out} == {Outcome.ERROR}
    assert "must return None, a BatchResult or a mapping" in out[0].error and problems


def test_a_bad_retry_delay_in_a_batch_is_an_ordinary_failure():
    [fate], _ = fates({"m1": Retry(float("nan"))}, [msg(1)])
    assert fate.outcome is Outcome.ERROR and "finite" in fate.error
    [fate], _ = fates({"m1": Reject("x")}, [msg(1)])
    assert fate.outcome is Outcome.REJECT


# -- the decorator ----------------------------------------------------------------------------------


def test_async_and_batch_tasks_are_recognised_with_their_defaults():
    try:

        @task("shape_async")
        async def a(m: Message) -> None:
            pass

        @task("shape_batch", batch_size=50)
        def b(ms: list[Message]) -> None:
            pass

        assert REGISTRY.is_async("shape_async") and not REGISTRY.is_async("shape_batch")
        options = REGISTRY.get("shape_batch").options  # type: ignore[union-attr]
        assert options.batch == 50 and options.batch_wait == 1.0
        assert REGISTRY.get("shape_async").options.batch == 1  # type: ignore[union-attr]
    finally:
        REGISTRY.clear()


# -- slots on a worker: queued sync jobs start when the one before ends ------------------------------


@pytest.fixture
def worker():
    a, b = socket.socketpair()
    yield WorkerHandle(1, 4242, a)
    a.close()
    b.close()


def hold(worker: WorkerHandle, seqs: list[int], mode: Mode, now: float, timeout: float = 10.0) -> None:
    worker.hold([(Job(seq, "t", msg(seq)), inflight(seq)) for seq in seqs], mode, timeout, now, grace=5.0)


def test_sync_jobs_queue_behind_the_running_one_and_start_when_it_ends(worker):
    hold(worker, [1], Mode.SYNC, now=100.0)
    hold(worker, [2, 3], Mode.SYNC, now=100.0)  # a batch of two, queued
    assert [s.seq for s in worker.started()] == [1] and worker.slots[2].deadline == float("inf")
    assert worker.room(Mode.SYNC, depth=2) == 0 and worker.room(Mode.ASYNC, depth=100) == 0
    slot, ran_for = worker.release(1, now=104.0)
    assert slot.seq == 1 and ran_for == 4.0
    assert {s.seq: s.deadline for s in worker.started()} == {2: 114.0, 3: 114.0}  # its timeout counts from now
    worker.release(2, now=105.0)
    assert worker.tasks_done == 1  # the batch's call has not ended yet
    worker.release(3, now=105.0)
    assert worker.tasks_done == 2 and worker.mode is None and worker.idle


def test_coroutines_all_start_at_once_and_are_overdue_only_after_the_kill_grace(worker):
    hold(worker, [1, 2, 3], Mode.ASYNC, now=0.0, timeout=10.0)  # one call... as a batch here
    hold(worker, [4], Mode.ASYNC, now=1.0, timeout=10.0)
    assert {s.seq: s.deadline for s in worker.started()} == {1: 15.0, 2: 15.0, 3: 15.0, 4: 16.0}
    assert worker.room(Mode.ASYNC, depth=5) == 3 and worker.room(Mode.SYNC, depth=2) == 0


def test_a_result_for_a_job_the_worker_does_not_hold_is_a_protocol_error(worker):
    hold(worker, [1], Mode.SYNC, now=0.0)
    with pytest.raises(WorkerProtocolError, match="no such job"):
        worker.release(99, now=1.0)


def test_max_tasks_per_child_limits_what_is_sent_not_just_what_ran(worker):
    worker.max_tasks = 2
    hold(worker, [1], Mode.SYNC, now=0.0)
    assert worker.room(Mode.SYNC, depth=5) == 1
    hold(worker, [2], Mode.SYNC, now=0.0)
    assert worker.room(Mode.SYNC, depth=5) == 0
    assert worker.live  # it still holds its place in the pool: no replacement is forked early
    worker.release(1, now=1.0)
    worker.release(2, now=2.0)
    assert worker.exhausted and not worker.live


def test_only_the_overdue_coroutine_timed_out_its_siblings_were_in_the_way():
    late = Slot(1, inflight(1), 1, 1.0, started_at=0.0, timed_out=True)
    sibling = Slot(2, inflight(2), 2, 1.0, started_at=0.0)
    assert outcome_of(KillReason.TIMEOUT, late) is Outcome.TIMEOUT
    assert outcome_of(KillReason.TIMEOUT, sibling) is Outcome.INTERRUPTED
    assert outcome_of(None, sibling) is Outcome.CRASH
    assert outcome_of(KillReason.DRAIN_TIMEOUT, late) is Outcome.INTERRUPTED


# -- forming batches ----------------------------------------------------------------------------------


def test_a_batch_takes_the_oldest_ready_messages_of_its_task_within_the_cap():
    backlog = Backlog()
    backlog.task_caps = {"rows": 4}  # concurrency 2 x batch_size 2
    for i, name in enumerate(["rows", "other", "rows", "rows", "rows", "rows"]):
        backlog.enqueue(inflight(i, name))
    first = backlog.next_ready(0.0)
    assert first is not None and first.task == "rows"
    more = backlog.take_batch("rows", 4, 0.0)
    assert [m.message.message_id for m in more] == ["m2", "m3", "m4"]  # the cap: 4 running at most
    backlog.unget([first, *more])  # a batch still filling goes back, in order, at the front
    assert [m.message.message_id for m in backlog.waiting] == ["m0", "m2", "m3", "m4", "m1", "m5"]
    assert backlog.running_bytes == 0 and not backlog.running_tasks


def test_a_busy_sync_worker_is_refilled_in_bulk_many_jobs_to_a_frame(tmp_path, worker):
    from consumerd.ipc.records import ForkServerSpec
    from consumerd.pool.pool import Pool
    from tests.unit.fakes import Harness, write_config

    intake = Harness(write_config(tmp_path / "c.toml", "[workers]\nconcurrency = 1\n")).stream.intake
    intake.task_seconds.add(0.0001)  # 0.1 ms tasks: 64 queued behind the running one
    assert intake.queue_depth() == 64
    pool = Pool(ForkServerSpec((), (), "json", "info", 0), 1, forget=lambda sock: None)
    pool.workers[worker.pid] = worker
    hold(worker, list(range(1, 11)), Mode.SYNC, now=0.0)  # one call of 10 messages: 1 unit
    for seq in range(11, 50):
        hold(worker, [seq], Mode.SYNC, now=0.0)  # 39 more: 40 units, room for 25 of 65
    assert intake.pick(pool, Mode.SYNC, set()) is None  # not yet: wait until half the queue is free
    for seq in range(11, 17):
        worker.release(seq, now=1.0)  # 34 units: room for 31
    assert intake.pick(pool, Mode.SYNC, set()) is None
    worker.release(17, now=1.0)  # 33 units: room for 32, half of 65
    assert intake.pick(pool, Mode.SYNC, set()) is worker
    assert intake.pick(pool, Mode.ASYNC, set()) is None  # it runs sync jobs


def test_a_worker_that_died_before_a_queued_job_reached_it_is_reported_by_its_exit_status(worker):
    from consumerd.pool.handles import WorkerExited

    exited_1 = 1 << 8  # wait status of exit(1)
    send_failed = WorkerExited(worker, [], [], exited_1, KillReason.SEND_FAILED, "exited with code 1")
    assert send_failed.cause == "exit_nonzero"  # it died by itself; the send only found out
    stuck = WorkerExited(worker, [], [], 9, KillReason.SEND_FAILED, "could not send job")  # our SIGKILL ended it
    assert stuck.cause == "send_failed"
    assert WorkerExited(worker, [], [], 9, KillReason.TIMEOUT, "timeout").cause == "timeout"

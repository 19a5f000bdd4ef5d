"""@on_task_failure / @on_task_success: once per message's outcome, with what the worker knows; never its fate."""

from __future__ import annotations

import collections
import socket

import pytest
from pydantic import BaseModel

import consumerd
from consumerd import BatchResult, Message, PayloadError, Reject, Retry, TaskFailure, TaskSuccess
from consumerd.errors import RegistryError
from consumerd.ipc.framing import result_reader
from consumerd.ipc.records import BatchJob, Job, Outcome, Result, TaskOptions
from consumerd.worker.child import run_batch, run_job
from consumerd.worker.coroutines import AsyncRunner
from consumerd.worker.registry import REGISTRY, Registry, on_task_failure, on_task_success
from tests.unit.fakes import Log


class Order(BaseModel):
    order_id: str


def msg(i: int, data: bytes = b"{}") -> Message:
    return Message(f"m{i}", data, {}, None, None, "", "s")


class Hooked:
    """A registry with one task ``t`` and hooks that record each call."""

    def __init__(self, func, **options) -> None:
        self.registry = Registry()
        self.registry.register("t", func, TaskOptions(**options))
        self.failures: list[TaskFailure] = []
        self.successes: list[TaskSuccess] = []
        self.registry.failure_hooks.append(self.failures.append)
        self.registry.success_hooks.append(self.successes.append)
        self.log = Log()

    def run(self, message: Message, attempt: int = 1) -> Result:
        return run_job(Job(1, "t", message, 0.0, attempt), self.registry, self.log)


def test_a_success_runs_the_success_hooks_once_with_the_result_and_duration():
    hooked = Hooked(lambda m: f"done {m.message_id}")
    assert hooked.run(msg(1), attempt=3).outcome is Outcome.SUCCESS
    [success] = hooked.successes
    assert (success.task, success.message.message_id, success.result, success.attempt) == ("t", "m1", "done m1", 3)
    assert success.duration >= 0 and hooked.failures == []


@pytest.mark.parametrize(
    ("exc", "attempt", "max_attempts", "fate"),
    [
        (Reject("never"), 1, None, "dead_letter"),
        (PayloadError("bad"), 1, None, "dead_letter"),
        (Retry(after=5), 9, 2, "retry"),
        (ValueError("flaky"), 1, None, "retry"),
        (ValueError("flaky"), 2, 3, "retry"),
        (ValueError("flaky"), 3, 3, "dead_letter"),
    ],
)
def test_a_failure_runs_the_failure_hooks_once_with_the_exception_attempt_and_fate(exc, attempt, max_attempts, fate):
    def task(_m):
        raise exc

    hooked = Hooked(task, max_attempts=max_attempts)
    hooked.run(msg(1), attempt=attempt)
    [failure] = hooked.failures
    assert failure.exception is exc and failure.attempt == attempt and failure.fate == fate
    assert failure.task == "t" and failure.message.message_id == "m1" and hooked.successes == []


def test_an_invalid_typed_payload_reaches_the_failure_hook_as_a_payload_error():
    def place(order: Order) -> None: ...

    hooked = Hooked(place)
    hooked.run(msg(1, b"[1]"))
    [failure] = hooked.failures
    assert isinstance(failure.exception, PayloadError) and failure.fate == "dead_letter"


def test_a_raising_hook_is_logged_and_changes_nothing():
    def task(m):
        if m.message_id == "m2":
            raise Retry(after=7)

    hooked = Hooked(task)
    calls = collections.Counter()

    def broken(event) -> None:
        calls[type(event).__name__] += 1
        raise RuntimeError("the tracker is down")

    hooked.registry.failure_hooks.insert(0, broken)
    hooked.registry.success_hooks.insert(0, broken)
    ok, retried = hooked.run(msg(1)), hooked.run(msg(2))
    assert ok == Result(1, Outcome.SUCCESS, ok.duration)
    assert (retried.outcome, retried.retry_after) == (Outcome.RETRY, 7.0)
    assert calls == {"TaskSuccess": 1, "TaskFailure": 1}
    assert len(hooked.successes) == 1 and len(hooked.failures) == 1  # the hooks after the broken one still ran
    failed = hooked.log.events("hook.failed")
    assert [(e["hook"], e["message_id"], e["error"]) for e in failed] == [
        (broken.__qualname__, "m1", "RuntimeError: the tracker is down"),
        (broken.__qualname__, "m2", "RuntimeError: the tracker is down"),
    ]


def test_a_batch_runs_the_hooks_once_per_message_by_its_own_outcome():
    def rows(orders: list[Order], msgs: list[Message]) -> BatchResult:
        result = BatchResult()
        result.retry(msgs[0], after=1)
        return result

    hooked = Hooked(rows, batch_size=10)
    jobs = (Job(1, "t", msg(1, b'{"order_id": "a"}')), Job(2, "t", msg(2, b"{}")), Job(3, "t", msg(3, b'{"order_id": "c"}')))
    results = run_batch(BatchJob("t", jobs), hooked.registry, hooked.log)
    assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.REJECT, Outcome.SUCCESS]
    assert {f.message.message_id: f.fate for f in hooked.failures} == {"m1": "retry", "m2": "dead_letter"}
    assert isinstance(hooked.failures[0].exception, Retry) and isinstance(hooked.failures[1].exception, PayloadError)
    assert [s.message.message_id for s in hooked.successes] == ["m3"]


def test_a_batch_that_raises_reports_each_message_with_that_exception():
    boom = RuntimeError("db down")

    def rows(msgs):
        raise boom

    hooked = Hooked(rows, batch_size=10)
    run_batch(BatchJob("t", (Job(1, "t", msg(1)), Job(2, "t", msg(2)))), hooked.registry, hooked.log)
    assert [(f.message.message_id, f.exception) for f in hooked.failures] == [("m1", boom), ("m2", boom)]


def test_async_tasks_run_the_hooks_too():
    async def task(m):
        if m.message_id == "m2":
            raise ValueError("async failure")
        return 42

    hooked = Hooked(task)
    ours, theirs = socket.socketpair()
    runner = AsyncRunner(theirs, None, hooked.registry, hooked.log, 1)  # type: ignore[arg-type]
    runner.run(collections.deque([Job(1, "t", msg(1)), Job(2, "t", msg(2), 0.0, 4)]))
    theirs.close()
    reader = result_reader()
    while data := ours.recv(1 << 16):
        reader.feed(data)
    assert {r.seq: r.outcome for r in reader.take()} == {1: Outcome.SUCCESS, 2: Outcome.ERROR}
    assert [(s.message.message_id, s.result) for s in hooked.successes] == [("m1", 42)]
    assert [(f.message.message_id, f.attempt, f.fate) for f in hooked.failures] == [("m2", 4, "retry")]


def test_the_decorators_register_in_the_process_registry_and_refuse_coroutines():
    try:

        @consumerd.on_task_failure
        def failure(event: TaskFailure) -> None: ...

        @consumerd.on_task_success
        def success(event: TaskSuccess) -> None: ...

        assert REGISTRY.failure_hooks == [failure] and REGISTRY.success_hooks == [success]
        assert consumerd.on_task_failure is on_task_failure and consumerd.on_task_success is on_task_success
        with pytest.raises(RegistryError, match="plain"):

            @on_task_failure
            async def nope(event: TaskFailure) -> None: ...

    finally:
        REGISTRY.clear()


def test_even_a_hook_that_calls_sys_exit_changes_nothing():
    import sys

    hooked = Hooked(lambda m: None)
    hooked.registry.success_hooks.insert(0, lambda event: sys.exit(3))
    assert hooked.run(msg(1)).outcome is Outcome.SUCCESS and len(hooked.successes) == 1
    assert [e["error"] for e in hooked.log.events("hook.failed")] == ["SystemExit: 3"]

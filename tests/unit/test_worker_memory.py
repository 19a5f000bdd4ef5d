"""A worker's memory limits: when it retires, the hard cap, its OOM score, and MemoryError as an ordinary failure."""

from __future__ import annotations

import collections
import os
import socket
import weakref
from pathlib import Path

import pytest

from consumerd.ipc.framing import job_reader, result_reader
from consumerd.ipc.records import BatchJob, Job, MemoryLimits, Outcome, Result, TaskOptions
from consumerd.message import Message
from consumerd.pool.handles import Mode, WorkerExited, WorkerHandle
from consumerd.worker import memory
from consumerd.worker.child import run_sync
from consumerd.worker.coroutines import AsyncRunner
from consumerd.worker.memory import OUT_OF_MEMORY, Watch, Why, over_limits
from consumerd.worker.registry import Registry
from tests.unit.fakes import Log

MiB = 2**20


def msg(i: int) -> Message:
    return Message(f"m{i}", b"", {}, None, None, "", "s")


def results_from(sock: socket.socket, n: int) -> list[Result]:
    reader = result_reader()
    out: list[Result] = []
    while len(out) < n:
        reader.feed(sock.recv(1 << 16))
        out += reader.take()
    return out


# -- the decision ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rss", "data", "limits", "why"),
    [
        (300 * MiB, 300 * MiB, MemoryLimits(), None),  # both off
        (200 * MiB, 0, MemoryLimits(retire_above=200 * MiB), None),  # at the limit is not above it
        (200 * MiB + 1, 0, MemoryLimits(retire_above=200 * MiB), Why.RSS),
        (10 * MiB, 449 * MiB, MemoryLimits(hard_cap=500 * MiB), None),
        (10 * MiB, 451 * MiB, MemoryLimits(hard_cap=500 * MiB), Why.NEAR_CAP),  # within a tenth of the cap
        (300 * MiB, 460 * MiB, MemoryLimits(200 * MiB, 500 * MiB), Why.RSS),
    ],
)
def test_a_worker_retires_above_max_memory_per_child_or_near_its_cap(rss, data, limits, why):
    assert over_limits(rss, data, limits) is why


class Sized(Watch):
    def __init__(self, limits: MemoryLimits, rss: int, log: Log | None = None) -> None:
        super().__init__(limits, log or Log())  # type: ignore[arg-type]
        self.rss = rss

    def size(self) -> tuple[int, int]:
        return self.rss, 0


def test_the_last_result_of_the_call_that_crossed_the_limit_is_flagged_once():
    log = Log()
    watch = Sized(MemoryLimits(retire_above=100 * MiB), rss=50 * MiB, log=log)
    batch = [Result(1, Outcome.SUCCESS, 0.1), Result(2, Outcome.ERROR, 0.1, "x")]
    assert watch.after(batch) == batch
    watch.rss = 150 * MiB
    flagged = watch.after(batch)
    assert [r.over_memory for r in flagged] == [False, True] and flagged[1].error == "x"
    assert watch.after(batch) == batch  # once: the supervisor already stopped sending
    assert log.events("worker.memory_retired") == [
        {"reason": "rss", "rss": 150 * MiB, "data": 0, "max_memory_per_child": 100 * MiB, "memory_limit": 0}
    ]


def test_without_limits_nothing_is_measured():
    watch = Watch(MemoryLimits(), Log())  # type: ignore[arg-type]
    results = [Result(1, Outcome.SUCCESS, 0.1)]
    assert watch.after(results) is results and watch._statm == -1


def test_the_real_statm_reads_this_process_and_survives_its_descriptor_being_closed():
    watch = Watch(MemoryLimits(retire_above=1), Log())  # type: ignore[arg-type]
    rss, data = watch.size()
    assert 5 * MiB < rss < 4096 * MiB and data > 0
    os.close(watch._statm)  # as a task that closes every descriptor would
    assert watch.size()[0] > 5 * MiB
    os.close(watch._statm)


# -- in the worker's loops ------------------------------------------------------------------------
@pytest.fixture
def channel():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def registry_with(**tasks) -> Registry:
    registry = Registry()
    for name, func in tasks.items():
        registry.register(name, func)
    return registry


def test_a_sync_worker_past_its_limit_flags_the_result_and_runs_on(channel):
    ours, theirs = channel
    registry = registry_with(ok=lambda m: None)
    watch = Watch(MemoryLimits(retire_above=1), Log())  # type: ignore[arg-type]  # any process is above 1 byte
    for i in (1, 2):
        run_sync(Job(i, "ok", msg(i)), theirs, registry, Log(), 1, watch)  # type: ignore[arg-type]
    first, second = results_from(ours, 2)
    assert (first.outcome, first.over_memory) == (Outcome.SUCCESS, True)
    assert (second.outcome, second.over_memory) == (Outcome.SUCCESS, False)  # what it already held still runs


def test_async_coroutines_past_the_limit_flag_one_result_and_all_finish(channel):
    ours, theirs = channel

    async def ok(m: Message) -> None:
        pass

    log = Log()
    runner = AsyncRunner(theirs, job_reader(), registry_with(ok=ok), log, 1, Watch(MemoryLimits(retire_above=1), log))  # type: ignore[arg-type]
    pending = collections.deque([Job(i, "ok", msg(i), 10.0) for i in (1, 2, 3)])
    assert runner.run(pending) == 3
    results = results_from(ours, 3)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 3 and sum(r.over_memory for r in results) == 1


def test_a_memory_error_is_an_ordinary_failure_and_frees_what_the_task_held_before_it_is_logged(channel):
    ours, theirs = channel
    held: list[weakref.ref] = []
    alive_when_logged: list[bool] = []

    class Big:
        pass

    class Watching(Log):
        def warning(self, event: str, **fields: object) -> None:
            alive_when_logged.append(held[0]() is not None)

    def hog(m: Message) -> None:
        block = Big()
        held.append(weakref.ref(block))
        raise MemoryError

    run_sync(Job(1, "hog", msg(1)), theirs, registry_with(hog=hog), Watching(), 1, Watch(MemoryLimits(), Log()))  # type: ignore[arg-type]
    [result] = results_from(ours, 1)
    assert result.outcome is Outcome.ERROR and result.error.startswith("MemoryError")
    assert alive_when_logged == [False]  # the task's locals went before its traceback was formatted


class OutOfMemoryLog(Log):
    def warning(self, event: str, **fields: object) -> None:
        raise MemoryError


def test_a_memory_error_while_reporting_a_failure_still_sends_one_per_message(channel):
    ours, theirs = channel

    def boom(ms: list[Message]) -> None:
        raise ValueError("the batch failed")

    registry = Registry()
    registry.register("rows", boom, TaskOptions(batch_size=2))
    batch = BatchJob("rows", (Job(1, "rows", msg(1)), Job(2, "rows", msg(2))))
    run_sync(batch, theirs, registry, OutOfMemoryLog(), 1, Watch(MemoryLimits(), Log()))  # type: ignore[arg-type]
    results = results_from(ours, 2)
    assert [(r.seq, r.outcome, r.error) for r in results] == [(1, Outcome.ERROR, OUT_OF_MEMORY), (2, Outcome.ERROR, OUT_OF_MEMORY)]


# -- the hard cap and the OOM score, in a forked child (they are for the process's whole life) ----
def in_child(body) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_rlimit_data_makes_a_2_gib_allocation_a_memory_error_and_the_worker_goes_on():
    def body() -> int:
        memory.cap_data(500 * MiB, Log())  # type: ignore[arg-type]
        try:
            bytearray(2 * 1024**3)
        except MemoryError:
            pass
        else:
            return 2
        blocks = [bytearray(MiB) for _ in range(300)]  # the cap leaves room for what a task may use
        return 0 if len(blocks) == 300 else 3

    assert in_child(body) == 0


def test_a_cap_below_what_the_worker_already_uses_is_logged():
    log = Log()

    def body() -> int:
        memory.cap_data(MiB, log)  # type: ignore[arg-type]
        return 0 if log.events("worker.memory_limit_too_low") else 4

    assert in_child(body) == 0


@pytest.mark.parametrize(("before", "after"), [(b"0", 500), (b"-900", -400), (b"700", 1000)])
def test_the_oom_score_is_raised_over_the_inherited_one(tmp_path, before, after):
    path = tmp_path / "oom_score_adj"
    path.write_bytes(before)
    assert memory.raise_oom_score(Log(), str(path)) == after  # type: ignore[arg-type]
    assert int(path.read_bytes()) == after


def test_an_oom_score_that_cannot_be_written_is_a_warning(tmp_path):
    log = Log()
    assert memory.raise_oom_score(log, str(tmp_path / "absent")) is None  # type: ignore[arg-type]
    assert log.events("worker.oom_score_unchanged")


def test_a_real_worker_raises_its_own_score_above_its_parents():
    parent = int(open("/proc/self/oom_score_adj").read())

    def body() -> int:
        memory.confine(MemoryLimits(), Log())  # type: ignore[arg-type]
        return 0 if int(open("/proc/self/oom_score_adj").read()) == min(1000, parent + memory.OOM_SCORE_RAISE) else 5

    assert in_child(body) == 0


# -- the pool's side ------------------------------------------------------------------------------
def test_a_worker_that_reported_over_memory_takes_no_job_and_its_exit_is_labelled():
    a, b = socket.socketpair()
    worker = WorkerHandle(1, 1234, a)
    worker.retire_for_memory()
    assert not worker.live and worker.room(Mode.SYNC, 5) == 0
    assert WorkerExited(worker, [], [], 0, None, "exited with code 0").cause == "max_memory"
    assert WorkerExited(worker, [], [], 1 << 8, None, "exited with code 1").cause == "exit_nonzero"
    a.close()
    b.close()


# -- configuration and units ----------------------------------------------------------------------
def test_a_reload_keeps_the_memory_settings_the_fork_server_handed_out():
    from consumerd.config import Settings, reload_plan

    old = Settings()
    new = Settings.model_validate({"workers": {"max_memory_per_child": "512MiB", "memory_limit": "1GiB", "concurrency": 3}})
    merged, applied, refused = reload_plan(old, new)
    assert set(refused) == {"workers.max_memory_per_child", "workers.memory_limit"} and applied == ["workers.concurrency"]
    assert (merged.workers.max_memory_per_child, merged.workers.memory_limit) == (0, 0)


@pytest.mark.parametrize("unit", ["consumerd.service", "consumerd@.service"])
def test_the_units_keep_the_service_running_when_the_kernel_kills_a_worker(unit):
    text = (Path(__file__).resolve().parents[2] / "systemd" / unit).read_text()
    assert "\nOOMPolicy=continue\n" in text

"""consumerd.testing: `run_task` gives what the daemon would do, in this process and in a forked worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydantic
import pytest

from consumerd import BatchResult, Message, Reject, Retry, TaskCancelled
from consumerd.ipc.records import TaskOptions
from consumerd.testing import Published, TaskOutcome, make_message, run_task
from consumerd.worker.registry import Registry

TASKS = Registry()


def register(name: str, **options: object):
    def decorate(func):
        TASKS.register(name, func, TaskOptions(**options))  # type: ignore[arg-type]
        return func

    return decorate


def note_cancelled(msg: Message) -> None:
    if "mark" in msg.attributes:  # a file: a forked worker's memory is gone with it
        Path(msg.attributes["mark"]).write_text("cancelled")


@register("ok")
def ok(msg: Message) -> None:
    assert msg.json() == {"order": 1}


@register("retry")
def retry(msg: Message) -> None:
    raise Retry(after=float(msg.attributes.get("after", "30")))


@register("reject")
def reject(msg: Message) -> None:
    raise Reject("negative amount")


@register("parse")
def parse(msg: Message) -> None:
    msg.json()


@register("boom", max_attempts=3)
def boom(msg: Message) -> None:
    raise ValueError("boom")


@register("slow")
def slow(msg: Message) -> None:
    try:
        time.sleep(30)
    except TaskCancelled:
        note_cancelled(msg)
        raise


@register("slow_with_own_timeout", timeout=0.2)
def slow_with_own_timeout(msg: Message) -> None:
    time.sleep(30)


@register("rows", batch_size=10)
def rows(msgs: list[Message]) -> BatchResult:
    result = BatchResult()
    for msg in msgs:
        kind = msg.attributes.get("fail")
        if kind == "retry":
            result.retry(msg, after=12)
        elif kind == "reject":
            result.reject(msg, "bad row")
        elif kind == "error":
            result.fail(msg, KeyError("row"))
    return result


@register("aio_ok")
async def aio_ok(msg: Message) -> None:
    await asyncio.sleep(0.01)
    assert msg.text() == "hello"


@register("aio_boom")
async def aio_boom(msg: Message) -> None:
    await asyncio.sleep(0)
    raise RuntimeError("async boom")


@register("aio_hang")
async def aio_hang(msg: Message) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        note_cancelled(msg)
        raise


@register("exit")
def exit_(msg: Message) -> None:
    os._exit(3)


@pytest.fixture(params=[False, True], ids=["in-process", "isolated"])
def isolated(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def run(name: str, data: object = b"", isolated: bool = False, **kw: object) -> TaskOutcome:
    outcome = run_task(name, data, isolated=isolated, registry=TASKS, **kw)  # type: ignore[arg-type]
    assert isinstance(outcome, TaskOutcome)
    return outcome


def test_a_task_that_returns_is_acked(isolated):
    outcome = run("ok", {"order": 1}, isolated)
    assert outcome == TaskOutcome(outcome.message_id, "success", acked=True)
    assert outcome.published == [] and outcome.retry_after is None and outcome.rejected is None and outcome.failed is None


def test_retry_comes_back_after_its_delay_as_the_daemon_applies_it(isolated):
    assert run("retry", isolated=isolated).retry_after == 30.0
    assert run("retry", isolated=isolated, attributes={"after": "1.4"}).retry_after == 1.0  # whole seconds
    assert run("retry", isolated=isolated, attributes={"after": "9999"}).retry_after == 600.0  # Pub/Sub's ceiling
    bad = run("retry", isolated=isolated, attributes={"after": "nan"})
    assert bad.retry_after is None and bad.failed == "Retry(after=nan): the delay must be a finite number >= 0"


def test_a_reject_is_dead_lettered_with_the_error_its_copy_carries(isolated):
    outcome = run("reject", isolated=isolated)
    assert (outcome.outcome, outcome.rejected, outcome.acked, outcome.failed) == ("reject", "Reject: negative amount", False, None)


def test_a_payload_that_does_not_decode_is_a_reject(isolated):
    assert run("parse", b"not json", isolated).rejected == "PayloadError: payload is not JSON: Expecting value at line 1 column 1"
    assert run("parse", b"\xff", isolated).rejected.startswith("PayloadError: payload is not utf-8 text")  # type: ignore[union-attr]


def test_an_ordinary_failure_is_retried_with_backoff_until_max_attempts(isolated):
    outcome = run("boom", isolated=isolated)
    assert (outcome.outcome, outcome.failed, outcome.retry_after, outcome.acked) == ("error", "ValueError: boom", None, False)
    last = run("boom", isolated=isolated, delivery_attempt=3)  # the task's max_attempts: dead-lettered
    assert last.rejected == "ValueError: boom" and last.failed is None


def test_a_timeout_raises_task_cancelled_inside_the_task(isolated, tmp_path):
    mark = tmp_path / "mark"
    started = time.monotonic()
    outcome = run("slow", isolated=isolated, timeout=0.2, attributes={"mark": str(mark)})
    assert time.monotonic() - started < 5
    assert (outcome.outcome, outcome.failed) == ("timeout", "timeout after 0.2s")
    assert mark.read_text() == "cancelled"  # its `except TaskCancelled:` ran
    assert run("slow_with_own_timeout", isolated=isolated).failed == "timeout after 0.2s"  # @task(timeout=...)


def test_a_batch_gives_one_outcome_per_message(isolated):
    messages = [make_message(b"", attributes={"fail": kind} if kind else {}) for kind in ("", "retry", "reject", "error", "")]
    outcomes = run_task("rows", messages, isolated=isolated, registry=TASKS)
    assert isinstance(outcomes, list)
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    assert [o.outcome for o in outcomes] == ["success", "retry", "reject", "error", "success"]
    assert outcomes[1].retry_after == 12.0 and outcomes[2].rejected == "Reject: bad row" and outcomes[3].failed == "KeyError: 'row'"
    [single] = run_task("rows", b"one", isolated=isolated, registry=TASKS)  # type: ignore[misc]
    assert single.acked


def test_async_tasks_run_on_the_workers_event_loop(isolated, tmp_path):
    assert run("aio_ok", "hello", isolated).acked
    assert run("aio_boom", isolated=isolated).failed == "RuntimeError: async boom"
    mark = tmp_path / "mark"
    hung = run("aio_hang", isolated=isolated, timeout=0.2, attributes={"mark": str(mark)})
    assert (hung.outcome, hung.failed) == ("timeout", "TaskTimeout: cancelled after 0.2s")
    assert mark.read_text() == "cancelled"


def test_in_process_runs_leave_this_process_as_they_found_it():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's, if it uses the signal method
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        run("aio_ok", "hello")
        run("slow", timeout=0.1)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)) == before
        assert 99 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100  # an outer timer keeps the time it had left
    finally:
        signal.setitimer(signal.ITIMER_REAL, outer)


def test_a_worker_that_dies_is_a_crash_only_when_isolated():
    outcome = run("exit", isolated=True)
    assert (outcome.outcome, outcome.failed) == ("crash", "exited with code 3")


def test_functions_by_reference_registered_or_not():
    assert run_task(reject, b"", registry=TASKS).rejected == "Reject: negative amount"  # type: ignore[union-attr]

    def undecorated(msg: Message) -> None:
        raise Retry(after=5)

    assert run_task(undecorated, b"").retry_after == 5.0  # type: ignore[union-attr]
    with pytest.raises(LookupError, match="no task named 'nope'"):
        run_task("nope", b"", registry=TASKS)


class Order(pydantic.BaseModel):
    id: int
    note: str = ""


def test_make_message_builds_what_the_worker_receives():
    assert make_message({"a": 1}).data == b'{"a":1}'
    assert make_message("héllo").text() == "héllo"
    assert Order.model_validate(make_message(Order(id=3)).json()) == Order(id=3)
    msg = make_message(b"x", {"task": "ok", "k": "v"}, ordering_key="o", delivery_attempt=2, message_id="m1", idempotency_attribute="k")
    assert (msg.message_id, dict(msg.attributes), msg.ordering_key, msg.delivery_attempt, msg.idempotency_key) == (
        "m1",
        {"task": "ok", "k": "v"},
        "o",
        2,
        "v",
    )
    assert msg.publish_time is not None and msg.subscription.startswith("projects/")
    assert make_message().message_id != make_message().message_id
    with pytest.raises(TypeError, match="attributes are text"):
        make_message(b"", {"n": 1})  # type: ignore[dict-item]
    assert Published("t", b"d") == Published("t", b"d", {}, "")


def test_importing_consumerd_testing_loads_neither_pytest_nor_worker_code():
    probe = (
        "import sys, consumerd.testing, consumerd.testing.emulator; "
        "print(sorted(m for m in sys.modules if m == 'pytest' or m.startswith('consumerd.worker')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_plugin_skips_emulator_tests_with_the_reason_where_there_is_no_emulator(tmp_path):
    (tmp_path / "test_uses_it.py").write_text("def test_it(pubsub_emulator, dead_letters):\n    raise AssertionError('ran')\n")
    env = {**os.environ, "PATH": str(tmp_path)}  # no gcloud on it
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout and "the Pub/Sub emulator is not available: gcloud not found" in done.stdout


def test_off_the_main_thread_signals_are_out_of_reach_unless_isolated():
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match="needs the main thread"):
            pool.submit(run, "aio_ok", "hello").result()
        assert pool.submit(run, "ok", {"order": 1}).result().acked  # no signal needed
        assert pool.submit(run, "slow", b"", True, timeout=0.2).result().outcome == "timeout"


def test_the_daemons_log_read_as_outcomes():
    from consumerd.testing.live import outcome_from_log

    done = {"event": "message.done", "message_id": "a", "attempt": 1, "outcome": "success"}
    retry = {"event": "message.failed", "message_id": "b", "attempt": 1, "outcome": "retry", "error": "x", "retry_in_s": 30}
    boom = {"event": "message.failed", "message_id": "c", "attempt": 2, "outcome": "timeout", "error": "timeout after 1s", "retry_in_s": 4}
    held = {"event": "message.failed", "message_id": "d", "attempt": 1, "outcome": "reject", "error": "Reject: no", "retry_in_s": 600}
    decided = {"event": "message.rejected", "message_id": "e", "attempt": 3, "outcome": "error", "error": "ValueError: v"}
    forwarded = {"event": "message.dead_lettered", "message_id": "e", "attempt": 3, "outcome": "dead_lettered"}
    log = [done, retry, boom, held, decided, forwarded]
    assert outcome_from_log(done, log) == TaskOutcome("a", "success", acked=True)
    assert outcome_from_log(retry, log) == TaskOutcome("b", "retry", retry_after=30.0)
    assert outcome_from_log(boom, log) == TaskOutcome("c", "timeout", failed="timeout after 1s")
    assert outcome_from_log(held, log) == TaskOutcome("d", "reject", rejected="Reject: no")
    assert outcome_from_log(forwarded, log) == TaskOutcome("e", "error", rejected="ValueError: v")

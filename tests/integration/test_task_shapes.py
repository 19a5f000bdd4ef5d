"""Issue 11: async and batch tasks on the real daemon and the real emulator."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.integration

FAST_RETRY = {"min_backoff": 0, "max_backoff": 1}


def wait_until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def peak_overlap(lines: list[list[str]], ids: set[str]) -> int:
    """The most of ``ids`` that had started and not yet finished at once, from the tasks' own ledger."""
    running = peak = 0
    for event, mid, *_ in lines:
        if mid in ids and event in ("start", "done"):
            running += 1 if event == "start" else -1
            peak = max(peak, running)
    return peak


def test_sync_and_async_tasks_mix_and_coroutines_share_a_worker(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    coroutines = broker.publish(topic, 40, task="aio_sleep", seconds="1")
    syncs = broker.publish(topic, 6, task="ok") + broker.publish(topic, 4, data={"seconds": 0.2}, task="sleep")
    daemon = make_daemon(sub, workers={"concurrency": 2, "async_concurrency": 50})
    daemon.wait_for_ids("message.done", set(coroutines + syncs), timeout=60)
    # 40 one-second coroutines on 2 workers: far more than 2 ran at once.
    assert peak_overlap(ledger.lines(), set(coroutines)) >= 10
    pids = {pid for event, mid, _, pid in ledger.lines() if event == "start" and mid in coroutines}
    assert len(pids) <= 2  # on the two workers, no more processes


def test_an_async_failure_fails_only_its_own_message(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [bad] = broker.publish(topic, task="aio_raise_once")
    good = broker.publish(topic, 5, task="aio_sleep", seconds="0.5")
    daemon = make_daemon(sub, workers={"concurrency": 1}, retry=FAST_RETRY)
    [failed] = daemon.wait_for("message.failed", message_id=bad)
    assert failed["outcome"] == "error" and "async failure" in failed["error"]
    daemon.wait_for_ids("message.done", {bad, *good}, timeout=30)
    assert not [e for e in daemon.select("message.failed") if e["message_id"] in good]


def test_a_hanging_coroutine_is_cancelled_at_its_timeout_and_retried(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="aio_hang_once")
    daemon = make_daemon(sub, retry=FAST_RETRY)
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "timeout" and "cancelled after 1s" in failed["error"]
    daemon.wait_for("message.done", message_id=mid, timeout=30)
    assert ledger.ids("cancelled") == [mid]  # its `except CancelledError` ran
    assert not daemon.select("worker.exited")  # the worker lived on


def test_a_coroutine_that_ignores_cancellation_gets_its_worker_killed_and_siblings_retried(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    siblings = broker.publish(topic, 3, task="aio_sleep_once")
    daemon = make_daemon(sub, workers={"concurrency": 1}, retry=FAST_RETRY)
    wait_until(lambda: len(ledger.ids("start")) >= 3)  # the three are running on the one worker
    [stubborn] = broker.publish(topic, task="aio_stubborn_once")
    [exited] = daemon.wait_for("worker.exited", timeout=30)
    assert exited["kill_reason"] == "timeout" and "cancellation ignored" in exited["reason"]
    [failed] = daemon.wait_for("message.failed", message_id=stubborn)
    assert failed["outcome"] == "timeout"
    interrupted = daemon.wait_for("message.failed", count=3, outcome="interrupted")
    assert {e["message_id"] for e in interrupted} == set(siblings)  # in the way of the kill: retried
    daemon.wait_for_ids("message.done", {stubborn, *siblings}, timeout=60)
    assert ledger.ids("ignored")  # it was cancelled first, and ignored that


def test_a_batch_task_gets_full_batches_and_only_its_failed_messages_come_back(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    dl_topic, _ = topic_sub()
    plain = broker.publish(topic, 12, task="rows")
    [retried] = broker.publish(topic, task="rows", fail="retry")
    [rejected] = broker.publish(topic, task="rows", fail="reject")
    daemon = make_daemon(sub, retry=FAST_RETRY, dead_letter={"topic": dl_topic})
    daemon.wait_for_ids("message.done", {*plain, retried}, timeout=60)
    daemon.wait_for("message.dead_lettered", message_id=rejected)
    runs = collections.Counter(mid for event, mid, *_ in ledger.lines() if event.startswith("batch="))
    assert runs[retried] == 2 and runs[rejected] == 1  # only the retried message came back
    assert all(runs[mid] == 1 for mid in plain)
    sizes = [int(event.split("=")[1]) for event, *_ in ledger.lines() if event.startswith("batch=")]
    assert max(sizes) == 5 and sizes.count(5) >= 10  # 14 waiting: full batches of 5 first
    [failed] = daemon.wait_for("message.failed", message_id=retried)
    assert failed["outcome"] == "retry"


def test_a_batch_that_raises_retries_all_of_it_and_async_batches_run(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    whole = broker.publish(topic, 3, task="rows_raise")
    coroutine_rows = broker.publish(topic, 25, task="aio_rows")
    daemon = make_daemon(sub, retry=FAST_RETRY)
    daemon.wait_for_ids("message.done", set(whole + coroutine_rows), timeout=60)
    failed = [e for e in daemon.select("message.failed") if e["message_id"] in whole]
    assert {e["message_id"] for e in failed} == set(whole) and {e["outcome"] for e in failed} == {"error"}
    sizes = [int(event.split("=")[1]) for event, mid, *_ in ledger.lines() if event.startswith("batch=") and mid in coroutine_rows]
    assert max(sizes) == 10


def test_jobs_queued_behind_a_crash_run_next_untouched(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    warm = broker.publish(topic, 30, task="ok")  # short tasks: each worker gets jobs queued behind its running one
    daemon = make_daemon(sub, workers={"concurrency": 1}, retry=FAST_RETRY)
    daemon.wait_for_ids("message.done", set(warm))
    [crash] = broker.publish(topic, task="slow_exit_once")
    queued = broker.publish(topic, 5, task="ok")
    [exited] = daemon.wait_for("worker.exited")
    done = daemon.wait_for_ids("message.done", {crash, *queued})
    assert exited["requeued"] >= 1  # the replacement worker ran them: no nack, no redelivery
    assert {e["attempt"] for e in done if e["message_id"] in queued} == {1}
    assert not [e for e in daemon.select("message.failed") if e["message_id"] in queued]

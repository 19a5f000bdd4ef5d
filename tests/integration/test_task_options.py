"""Issue 11: per-task options, worker hooks, and a graceful end for sync tasks (real daemon, real emulator)."""

from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.integration


def test_per_task_concurrency_is_never_exceeded_and_other_tasks_still_run(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    capped = broker.publish(topic, 10, task="capped")
    others = broker.publish(topic, 10, task="ok")
    daemon = make_daemon(sub, workers={"concurrency": 4})
    daemon.wait_for_ids("message.done", set(capped + others), timeout=60)
    spans = {}
    for event, mid, *_ in ledger.lines():
        if event.startswith(("capped_start=", "capped_end=")):
            kind, stamp = event.split("=")
            spans.setdefault(mid, {})[kind] = float(stamp)
    edges = sorted([(s["capped_start"], 1) for s in spans.values()] + [(s["capped_end"], -1) for s in spans.values()])
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert len(spans) == 10 and peak == 2  # the tasks' own ledger: 2 at most, and 2 did overlap


def test_per_task_timeout_replaces_the_global_one(broker, topic_sub, make_daemon):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="short_timeout", seconds="5")
    daemon = make_daemon(sub, workers={"task_timeout": 60}, retry={"min_backoff": 600, "max_backoff": 600})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "timeout" and failed["error"] == "timeout after 1s"


def test_a_task_catching_the_cancellation_cleans_up_before_its_worker_ends(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    [mid] = broker.publish(topic, task="cleanup_on_cancel")
    daemon = make_daemon(sub, retry={"min_backoff": 600, "max_backoff": 600})
    [failed] = daemon.wait_for("message.failed", message_id=mid, timeout=30)
    assert failed["outcome"] == "timeout" and failed["duration_ms"] < 4000  # ended by the exception, not SIGKILL 5 s later
    assert ledger.ids("cleaned") == [mid]


def test_per_task_backoff_and_max_attempts(broker, topic_sub, make_daemon, ledger):
    topic, sub = topic_sub()
    dl_topic, _ = topic_sub()
    [quick] = broker.publish(topic, task="fast_retry_once")
    [doomed] = broker.publish(topic, task="crash_twice_max")
    daemon = make_daemon(sub, retry={"min_backoff": 30, "max_backoff": 600}, dead_letter={"topic": dl_topic, "max_attempts": 10})
    [failed] = daemon.wait_for("message.failed", message_id=quick)
    assert failed["retry_in_s"] == 0  # its own max_backoff = 0, not the global 30 s floor
    daemon.wait_for("message.done", message_id=quick)
    # crash_twice_max: its own max_attempts = 2 (the global is 10); retried once at its backoff...
    [rejected] = daemon.wait_for("message.rejected", message_id=doomed, timeout=90)
    assert rejected["attempt"] == 2
    daemon.wait_for("message.dead_lettered", message_id=doomed)


def test_worker_hooks_run_once_per_worker(broker, topic_sub, make_daemon, ledger, tmp_path):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 6, task="ok")
    daemon = make_daemon(
        sub, workers={"concurrency": 2, "max_tasks_per_child": 2}, tasks={"modules": ["tests.support.tasks", "tests.support.hooks"]}
    )
    daemon.wait_for_ids("message.done", set(ids))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    lines = [line.split() for line in (tmp_path / "hooks.txt").read_text().splitlines()]
    starts = [pid for kind, pid in lines if kind == "start"]
    stops = [pid for kind, pid in lines if kind == "stop"]
    assert len(starts) == len(set(starts)) >= 3  # 6 tasks, 2 per worker: at least 3 workers, one start each
    assert sorted(stops) == sorted(starts)  # and each ended its own


def test_a_failing_start_hook_stops_the_daemon_with_78_and_its_traceback(topic_sub, make_daemon):
    _, sub = topic_sub()
    daemon = make_daemon(sub, tasks={"modules": ["tests.support.tasks", "tests.support.hooks"]}, env={"FAIL_START_HOOK": "1"})
    assert daemon.wait_exit(30) == 78
    failed = daemon.select("worker.start_hook_failed")[0]  # every worker started at once reports it
    assert "database is unreachable" in failed["error"] and "Traceback" in failed["exception"]
    assert not daemon.select("daemon.ready")

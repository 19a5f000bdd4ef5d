"""Rate limits in the real daemon against the emulator: per host (the steady rate within 5 %, other
tasks overtaking the waiting ones), and across two daemons sharing one real redis-server (their
combined rate within 5 %; Redis killed mid-run: both go on at their share, and say so)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stream_tasks import ledger

pytestmark = pytest.mark.integration
MODULES = {"modules": ["tests.support.stream_tasks", "tests.support.tasks"]}


def starts(directory: Path) -> list[float]:
    return sorted(t for event, _, _, t in ledger(directory) if event == "start")


def steady_rate(times: list[float], skip: int) -> float:
    """Messages per second after the first ``skip`` (the bucket's first second, which may burst)."""
    steady = times[skip:]
    return (len(steady) - 1) / (steady[-1] - steady[0])


def test_a_rate_limited_task_runs_at_its_rate_while_other_tasks_overtake_it(broker, topic_sub, make_daemon, tmp_path, ledger):
    topic, sub = topic_sub()
    limited = broker.publish(topic, 300, task="stream_sleep", seconds="0")
    unlimited = broker.publish(topic, 200, task="ok")
    daemon = make_daemon(sub, tasks={**MODULES, "rate_limits": {"stream_sleep": "50/s"}}, workers={"concurrency": 4})
    daemon.wait_for_ids("message.done", set(limited + unlimited), timeout=60)
    times = starts(tmp_path)
    assert len(times) == 300
    rate = steady_rate(times, skip=50)
    assert abs(rate - 50) <= 2.5, rate  # within 5 %
    assert times[-1] - times[0] >= (300 - 50) / 50 * 0.95  # no more than the first second's burst
    done = {e["message_id"]: e["timestamp"] for e in daemon.select("message.done")}
    assert max(done[m] for m in unlimited) < sorted(done[m] for m in limited)[150]  # the others did not wait behind them
    address = daemon.select("metrics.listening")[0]["address"]
    import urllib.request

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert 'consumerd_rate_limit_wait_seconds_count{task="stream_sleep"} 300.0' in text


redis_installed = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed (make test installs it)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator:
    pytest.importorskip("redis", reason="the redis extra is not installed (pip install -e '.[test]' brings it)")
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@redis_installed
def test_two_daemons_share_one_limit_through_redis_and_fall_back_to_their_share_without_it(
    broker, topic_sub, make_daemon, tmp_path, redis_server
):
    topic, sub = topic_sub()
    ids = broker.publish(topic, 500, task="stream_sleep", seconds="0")
    config = {"tasks": {**MODULES, "rate_limits": {"stream_sleep": "40/s"}}, "rate_limit": {"redis": redis_server.url, "hosts": 2}}
    first, second = make_daemon(sub, **config), make_daemon(sub, **config)
    first.wait_ready(), second.wait_ready()
    time.sleep(5)
    shared = starts(tmp_path)
    rate = steady_rate(shared, skip=40)
    assert abs(rate - 40) <= 2.0, rate  # the two daemons together: within 5 % of the one limit
    redis_server.kill()
    killed_at, before = time.time(), len(shared)
    for daemon in (first, second):
        [fallback] = daemon.wait_for("rate_limit.fallback", timeout=10)
        assert fallback["shares"] == {"stream_sleep": "20/s"}
    time.sleep(4)
    after = [t for t in starts(tmp_path) if t > killed_at + 1]
    assert len(starts(tmp_path)) > before + 100  # both went on consuming
    assert abs(steady_rate(after, skip=0) - 40) <= 4, after[:3]  # each its share: 20/s + 20/s
    stopped = [d.stop() for d in (first, second)]
    assert all(s is not None for s in stopped)
    assert len({m for _, m, _, _ in ledger(tmp_path)}) <= len(ids)

"""Fleet-wide rate limits against a real redis-server on loopback: two limiters stand in for two hosts,
each driven by a small loop like the supervisor's (ask, sleep until `wait_until` or the inbox wakes
it); Redis is killed mid-run and started again."""

from __future__ import annotations

import hashlib
import select
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumerd.adapters.prometheus import Metrics
from consumerd.adapters.ratelimit import SCRIPT, FleetRateLimits, RedisGcra
from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff
from consumerd.policy.ratelimit import Rate
from tests.support.redis_server import RedisServer

redis = pytest.importorskip("redis", reason="the redis extra is not installed (pip install -e '.[test]' brings it)")
pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed (make test installs it)")

RATE = Rate.parse("50/s")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, _level: str) -> Callable[..., None]:
        return lambda event, **fields: self.records.append((event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in list(self.records) if event == name]


class Host:
    """One daemon's loop, reduced to a rate-limited task with messages always waiting."""

    def __init__(self, url: str, hosts: int = 2) -> None:
        self.inbox = Inbox()
        self.metrics = Metrics("test", lambda: ({}, {}), exit_causes=())
        store = RedisGcra(url, timeout=0.1)
        backoff = Backoff(base=0.05, cap=0.2)  # notice the restart quickly
        self.limiter = FleetRateLimits(store, self.inbox, self.metrics, key_prefix="test:", timeout=0.1, backoff=backoff)
        self.limiter.log = Log()  # type: ignore[assignment]
        self.limiter.configure({"send": RATE}, hosts=hosts)
        self.started: list[float] = []
        self.answer_delays: list[float] = []  # ask to answer, as the loop sees it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Host:
        self.limiter.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.limiter.stop()

    def _loop(self) -> None:
        asked_at: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            for answer in self.inbox.take_all():
                if asked_at is not None:
                    self.answer_delays.append(now - asked_at)
                    asked_at = None
                self.limiter.on_answer(answer, now)
            while self.limiter.allow("send", now):
                self.started.append(now)
            if asked_at is None and "send" in self.limiter._asked:  # an ask went to the thread
                asked_at = now
            until = self.limiter.wait_until("send", now)
            assert until is not None
            select.select([self.inbox.fd], [], [], min(max(until - now, 0.0), 0.1))

    def count(self, since: float, until: float) -> int:
        return sum(1 for t in list(self.started) if since <= t < until)

    def metric(self, name: str) -> float:
        line = next(line for line in self.metrics.exposition().decode().splitlines() if line.startswith(name + " "))
        return float(line.split()[1])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_round_trip_to_a_local_redis_is_well_under_a_millisecond_and_noscript_is_recovered(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    store = RedisGcra(redis_server.url, timeout=0.25)
    admin.script_flush()  # as after a restart of Redis: EVALSHA fails with NOSCRIPT, EVAL recovers
    assert store.take("rtt:probe", 1e-6, 0.0) == 0.0
    assert admin.script_exists(hashlib.sha1(SCRIPT.encode()).hexdigest()) == [True]
    delays = []
    for _ in range(500):
        start = time.perf_counter()
        store.take("rtt:probe", 1e-6, 0.0)
        delays.append(time.perf_counter() - start)
    delays.sort()
    assert delays[250] < 0.002 and delays[495] < 0.02, (delays[250], delays[495])
    print(f"EVALSHA round trip: p50 {delays[250] * 1e6:.0f} us, p99 {delays[495] * 1e6:.0f} us")
    assert SCRIPT.count("redis.call('TIME')") == 1  # Redis's clock decides, not the hosts'
    store.close()
    admin.close()


def test_two_hosts_sharing_one_redis_admit_the_limit_between_them(redis_server):
    hosts = [Host(redis_server.url).start(), Host(redis_server.url).start()]
    begin = time.monotonic()
    time.sleep(3.0)
    for host in hosts:
        host.stop()
    # The first second may burst up to one second's tokens (50); after it the fleet holds 50/s.
    burst = sum(host.count(begin, begin + 0.05) for host in hosts)
    steady = sum(host.count(begin + 1.0, begin + 3.0) for host in hosts) / 2.0
    total = sum(len(host.started) for host in hosts)
    assert burst <= 50 + 50 * 0.05 + 1 and steady == pytest.approx(50, rel=0.05), (burst, steady)
    assert total <= 50 + 50 * (time.monotonic() - begin) + 1
    assert all(host.count(begin + 1.0, begin + 3.0) >= 20 for host in hosts)  # neither host starves
    assert not any(host.limiter.log.events("rate_limit.fallback") for host in hosts)
    delays = sorted(d for host in hosts for d in host.answer_delays)
    assert len(delays) > 100 and delays[len(delays) // 2] < 0.005, delays[len(delays) // 2]
    print(
        f"burst {burst}, steady {steady:.2f}/s, split {[host.count(begin + 1.0, begin + 3.0) for host in hosts]}, "
        f"ask-to-answer p50 {delays[len(delays) // 2] * 1e6:.0f} us p99 {delays[len(delays) * 99 // 100] * 1e6:.0f} us over {len(delays)}"
    )


def test_redis_killed_mid_run_both_fall_back_to_their_share_then_restore(redis_server):
    hosts = [Host(redis_server.url).start(), Host(redis_server.url).start()]
    time.sleep(1.0)
    killed = time.monotonic()
    redis_server.kill()
    wait_for(lambda: all(host.limiter.falling_back for host in hosts))
    down = time.monotonic()
    time.sleep(2.0)
    # Each applies its share, 25/s (a 25-token bucket, full when the outage starts): the fleet stays at 50/s.
    for host in hosts:
        assert host.count(down + 1.0, down + 2.0) == pytest.approx(25, abs=2)
        (event,) = host.limiter.log.events("rate_limit.fallback")
        assert "Connection" in event["error"] and event["shares"] == {"send": "25/s"}
        assert host.metric("consumerd_rate_limit_fallback") == 1 and host.metric("consumerd_rate_limit_fallbacks_total") == 1
    restarted = time.monotonic()
    redis_server.start()  # the same port, empty: no script, no keys
    wait_for(lambda: not any(host.limiter.falling_back for host in hosts))
    back = time.monotonic()
    time.sleep(2.0)
    for host in hosts:
        host.stop()
    assert sum(host.count(back + 1.0, back + 2.0) for host in hosts) == pytest.approx(50, rel=0.1)
    print(
        f"fallback noticed in {(down - killed) * 1e3:.0f} ms, shares {[host.count(down + 1.0, down + 2.0) for host in hosts]}/s; "
        f"restored {(back - restarted) * 1e3:.0f} ms after the restart, then {sum(host.count(back + 1.0, back + 2.0) for host in hosts)}/s"
    )
    for host in hosts:
        assert len(host.limiter.log.events("rate_limit.restored")) == 1 and len(host.limiter.log.events("rate_limit.fallback")) == 1
        assert host.metric("consumerd_rate_limit_fallback") == 0 and host.metric("consumerd_rate_limit_fallbacks_total") == 1

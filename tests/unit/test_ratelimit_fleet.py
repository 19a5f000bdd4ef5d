"""The fleet-wide limiter's loop side and its thread, against a fake GCRA store (no Redis): asks go to
the thread, answers come back through the inbox, an outage falls back to this host's share once."""

import select
import threading
from collections.abc import Iterator

import pytest

from consumerd.adapters.ratelimit import Answer, FleetRateLimits, RateAnswer
from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff
from consumerd.policy.ratelimit import Rate
from tests.unit.fakes import Log


class Store:
    """A GCRA store whose answers the test sets: grant, wait N seconds, fail, or hang until released."""

    def __init__(self) -> None:
        self.takes: list[tuple[str, float, float]] = []
        self.wait = 0.0
        self.down: Exception | None = None
        self.hang = threading.Event()
        self.hang.set()
        self.pings = 0

    def take(self, key: str, interval: float, tolerance: float) -> float:
        self.takes.append((key, interval, tolerance))
        self.hang.wait()
        if self.down is not None:
            raise self.down
        return self.wait

    def ping(self) -> None:
        self.pings += 1
        if self.down is not None:
            raise self.down

    def close(self) -> None:
        pass


class Metrics:
    def __init__(self) -> None:
        self.fallbacks: list[bool] = []

    def rate_limit_fallback(self, active: bool) -> None:
        self.fallbacks.append(active)


@pytest.fixture
def fleet() -> Iterator[tuple[FleetRateLimits, Store, Inbox, Metrics]]:
    store, inbox, metrics = Store(), Inbox(), Metrics()
    limiter = FleetRateLimits(store, inbox, metrics, key_prefix="t:", timeout=0.05, backoff=Backoff(base=0.01, cap=0.02))  # type: ignore[arg-type]
    limiter.log = Log()  # type: ignore[assignment]
    limiter.configure({"send": Rate.parse("50/s")}, hosts=2)
    limiter.start()
    yield limiter, store, inbox, metrics
    store.hang.set()
    limiter.stop()


def answers(limiter: FleetRateLimits, inbox: Inbox, now: float, timeout: float = 5.0) -> list[RateAnswer]:
    """What the thread posted, as the loop sees it: wait for the inbox's fd, then hand each over."""
    assert select.select([inbox.fd], [], [], timeout)[0], "no answer through the inbox"
    items = inbox.take_all()
    for item in items:
        limiter.on_answer(item, now)
    return items


def test_a_token_is_asked_for_once_and_taken_when_its_answer_arrives(fleet):
    limiter, store, inbox, _ = fleet
    assert not limiter.allow("send", 10.0)
    assert not limiter.allow("send", 10.0)  # the same ask is still out: no second one
    assert limiter.wait_until("send", 10.0) == 10.0 + limiter.answer_deadline  # the answer will wake the loop sooner
    assert [a.answer for a in answers(limiter, inbox, 10.001)] == [Answer.GRANTED]
    assert store.takes == [("t:send", pytest.approx(0.02), pytest.approx(49 * 0.02))]  # the fleet's rate, not the share
    assert limiter.wait_until("send", 10.001) == 10.001 and limiter.allow("send", 10.001)
    assert not limiter.allow("send", 10.002)  # the next message asks again
    answers(limiter, inbox, 10.003)
    assert len(store.takes) == 2


def test_a_denial_says_when_to_ask_again_and_nothing_is_asked_before(fleet):
    limiter, store, inbox, _ = fleet
    store.wait = 0.015
    assert not limiter.allow("send", 1.0)
    assert [a.answer for a in answers(limiter, inbox, 1.0)] == [Answer.DENIED]
    assert limiter.wait_until("send", 1.0) == pytest.approx(1.015)
    assert not limiter.allow("send", 1.01) and len(store.takes) == 1
    store.wait = 0.0
    assert not limiter.allow("send", 1.015)
    answers(limiter, inbox, 1.016)
    assert len(store.takes) == 2 and limiter.allow("send", 1.016)


def test_an_unclaimed_token_goes_stale_and_a_task_without_a_limit_never_asks(fleet):
    limiter, store, inbox, _ = fleet
    limiter.allow("send", 0.0)
    answers(limiter, inbox, 0.0)
    assert not limiter.allow("send", 5.0)  # its message left meanwhile: the token is not spent seconds late
    answers(limiter, inbox, 5.0)
    assert all(limiter.allow("other", 0.0) for _ in range(50)) and limiter.wait_until("other", 0.0) is None
    assert [key for key, _, _ in store.takes] == ["t:send", "t:send"]


def test_redis_unreachable_falls_back_to_this_hosts_share_once_then_restores(fleet):
    limiter, store, inbox, metrics = fleet
    store.down = ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    assert not limiter.allow("send", 0.0)
    assert [a.answer for a in answers(limiter, inbox, 0.0)] == [Answer.UNREACHABLE]
    assert limiter.falling_back and metrics.fallbacks == [True]
    assert sum(limiter.allow("send", 0.0) for _ in range(100)) == 25  # 50/s over 2 hosts: a 25-token bucket
    assert limiter.wait_until("send", 0.0) == pytest.approx(0.04)
    (event,) = limiter.log.events("rate_limit.fallback")
    assert "Connection refused" in event["error"] and event["hosts"] == 2 and event["shares"] == {"send": "25/s"}
    pings = store.pings
    store.down = None  # Redis is back: the thread's next ping says so
    assert [a.answer for a in answers(limiter, inbox, 30.0)] == [Answer.RESTORED]
    assert store.pings > pings and not limiter.falling_back and metrics.fallbacks == [True, False]
    assert limiter.log.events("rate_limit.restored") == [{"after": 30.0}]
    assert not limiter.allow("send", 30.0)  # Redis decides again
    assert [a.answer for a in answers(limiter, inbox, 30.0)] == [Answer.GRANTED]


def test_an_outage_is_logged_once_however_many_asks_fail(fleet):
    limiter, store, inbox, metrics = fleet
    store.down = TimeoutError("Timeout reading from socket")
    limiter.allow("send", 0.0)
    answers(limiter, inbox, 0.0)
    limiter.on_answer(RateAnswer(Answer.UNREACHABLE, error="again"), 1.0)
    assert len(limiter.log.events("rate_limit.fallback")) == 1 and metrics.fallbacks == [True]


def test_redis_that_never_answers_counts_as_an_outage_without_blocking_the_loop(fleet):
    limiter, store, inbox, metrics = fleet
    store.hang.clear()  # the call hangs, as behind a black-holed route whose timeouts do not fire
    assert not limiter.allow("send", 0.0)
    assert limiter.allow("other", 0.0)  # the loop carries on meanwhile
    assert not limiter.allow("send", limiter.answer_deadline - 0.01) and not limiter.falling_back
    assert limiter.allow("send", limiter.answer_deadline + 0.01)  # silence past the deadline: this host's share
    assert limiter.falling_back and "no answer within" in limiter.log.events("rate_limit.fallback")[0]["error"]
    store.hang.set()  # the call returns after all: Redis answers, so it decides again
    answers(limiter, inbox, 10.0)
    assert not limiter.falling_back and metrics.fallbacks == [True, False]


def test_redis_down_at_start_up_falls_back_before_any_message(fleet):
    limiter, store, inbox, metrics = fleet
    limiter.stop()
    store2 = Store()
    store2.down = ConnectionError("refused")
    inbox2 = Inbox()
    late = FleetRateLimits(store2, inbox2, metrics, timeout=0.05, backoff=Backoff(base=10, cap=10))  # type: ignore[arg-type]
    late.log = Log()  # type: ignore[assignment]
    late.configure({"send": Rate.parse("1/s")})
    late.start()
    assert [a.answer for a in answers(late, inbox2, 0.0)] == [Answer.UNREACHABLE] and late.falling_back
    late.stop()  # returns at once, though the thread waits 10 s between pings
    assert store2.takes == []


def test_a_reload_drops_what_it_knew_of_tasks_no_longer_limited(fleet):
    limiter, store, inbox, _ = fleet
    limiter.allow("send", 0.0)
    answers(limiter, inbox, 0.0)
    limiter.configure({"mail": Rate.parse("1/s")})
    assert "send" not in limiter and limiter.allow("send", 0.0) and "mail" in limiter
    limiter.configure({"send": Rate.parse("50/s")})
    assert not limiter.allow("send", 0.0)  # the old token went with the old limit

"""Pure delivery rules: retry delays, dead letters, poison messages, adaptive lease length, backlog."""

import pytest

from consumerd.ipc.held import InFlight
from consumerd.ipc.records import Outcome
from consumerd.message import Message
from consumerd.policy import delivery
from consumerd.policy.backlog import Backlog
from consumerd.policy.delivery import Decision, RetryPolicy, decide
from consumerd.policy.histogram import Histogram

POLICY = RetryPolicy(min_backoff=10, max_backoff=600)


def test_retry_delay_grows_exponentially_with_full_jitter_above_the_floor():
    assert [POLICY.delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6, 7, 50)] == [10, 20, 40, 80, 160, 320, 600, 600]
    assert {POLICY.delay(n, rand=lambda: 0.0) for n in (1, 5, 50)} == {10}
    assert POLICY.delay(3, rand=lambda: 0.5) == 25


def test_success_acks():
    assert decide(Outcome.SUCCESS, 1, POLICY, dead_letter=True) == Decision("ack")


@pytest.mark.parametrize("outcome", [Outcome.ERROR, Outcome.CRASH, Outcome.TIMEOUT])
def test_failures_retry_after_backoff_by_attempt(outcome):
    assert decide(outcome, 3, POLICY, dead_letter=False, rand=lambda: 1.0) == Decision("retry", 40)


def test_task_requested_delay_is_honoured_and_capped_at_600():
    assert decide(Outcome.RETRY, 1, POLICY, dead_letter=False, retry_after=3.2).delay == 3
    assert decide(Outcome.RETRY, 1, POLICY, dead_letter=False, retry_after=5000).delay == 600


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1, True, "5"])
def test_a_retry_delay_that_is_not_a_finite_number_ge_0_is_an_ordinary_failure(bad):
    # Issue 9: Retry(after=nan) crashed the supervisor (int(nan)); now it is retried with its backoff.
    assert decide(Outcome.RETRY, 3, POLICY, dead_letter=False, retry_after=bad, rand=lambda: 1.0) == Decision("retry", 40)
    assert not delivery.valid_retry_after(bad)


def test_clamp_delay_never_raises_on_non_finite_values():
    assert delivery.clamp_delay(float("nan")) == 600
    assert delivery.clamp_delay(float("inf")) == 600
    assert delivery.clamp_delay(-5) == 0


@pytest.mark.parametrize("outcome", [Outcome.REJECT, Outcome.UNKNOWN_TASK, Outcome.TOO_LARGE])
def test_poison_is_dead_lettered_or_held_at_maximum_backoff(outcome):
    assert decide(outcome, 1, POLICY, dead_letter=True).action == "dead_letter"
    held = decide(outcome, 1, POLICY, dead_letter=False)
    assert held.action == "retry" and held.delay == 600


def test_max_attempts_forwards_a_message_that_keeps_failing():
    assert decide(Outcome.CRASH, 4, POLICY, dead_letter=True, max_attempts=5).action == "retry"
    assert decide(Outcome.CRASH, 5, POLICY, dead_letter=True, max_attempts=5).action == "dead_letter"
    assert decide(Outcome.RETRY, 5, POLICY, dead_letter=True, max_attempts=5, retry_after=1).action == "dead_letter"


def test_messages_we_interrupted_come_back_at_once():
    for outcome in (Outcome.INTERRUPTED, Outcome.SHUTDOWN):
        assert decide(outcome, 9, POLICY, dead_letter=True) == Decision("retry", 0, "given back at once for another consumer")


def test_histogram_percentile_clamps_and_rounds_up():
    h = Histogram(minimum=10, maximum=600)
    assert h.percentile(99) == 10  # nothing yet: the minimum
    for _ in range(98):
        h.add(2.5)  # clamped up to 10
    h.add(45.2)
    h.add(10_000)  # clamped down to 600
    assert h.samples == 100
    assert h.percentile(50) == 10
    assert h.percentile(99) == 46
    assert h.percentile(100) == 600


def inflight(mid, key="", size=10):
    return InFlight(f"ack-{mid}", Message(mid, b"x" * size, {}, None, None, key, "s"), "t", 1, 0.0)


def test_backlog_runs_one_message_per_ordering_key_in_order():
    backlog = Backlog(ordered=True)
    a1, a2, b1 = inflight("a1", "A"), inflight("a2", "A"), inflight("b1", "B")
    for m in (a1, a2, b1):
        backlog.hold(m)
        backlog.enqueue(m)
    assert backlog.next_ready(0.0) is a1
    assert backlog.next_ready(0.0) is b1  # a2 waits for a1
    assert backlog.next_ready(0.0) is None
    backlog.finished(a1)
    assert backlog.next_ready(0.0) is a2


def test_backlog_holds_a_key_after_a_failure_and_hands_back_its_waiting_messages():
    backlog = Backlog(ordered=True)
    a1, a2, a3 = inflight("a1", "A"), inflight("a2", "A"), inflight("a3", "A")
    for m in (a1, a2, a3):
        backlog.hold(m)
        backlog.enqueue(m)
    assert backlog.next_ready(0.0) is a1
    backlog.finished(a1)
    assert backlog.hold_key("A", until=30.0) == [a2, a3]
    assert backlog.key_blocked_for("A", 10.0) == 20.0
    late = inflight("a4", "A")
    backlog.enqueue(late)
    assert backlog.next_ready(29.0) is None
    assert backlog.next_ready(30.0) is late


def test_unordered_backlog_ignores_keys():
    backlog = Backlog(ordered=False)
    a1, a2 = inflight("a1", "A"), inflight("a2", "A")
    for m in (a1, a2):
        backlog.enqueue(m)
    assert backlog.next_ready(0.0) is a1 and backlog.next_ready(0.0) is a2
    assert backlog.hold_key("A", 10.0) == [] and backlog.key_blocked_for("A", 0.0) == 0.0


def test_byte_budget_limits_what_runs_but_never_starves_a_big_message():
    backlog = Backlog(max_running_bytes=1000)
    small, big, other = inflight("s", size=600), inflight("b", size=5000), inflight("o", size=100)
    for m in (small, big, other):
        backlog.hold(m)
        backlog.enqueue(m)
    assert backlog.held_bytes == 5700
    assert backlog.next_ready(0.0) is small
    assert backlog.next_ready(0.0) is None  # big does not fit beside small; nothing overtakes it
    backlog.finished(small)
    assert backlog.next_ready(0.0) is big  # alone, it may run whatever its size
    backlog.finished(big)
    backlog.released(small)
    backlog.released(big)
    assert backlog.next_ready(0.0) is other and backlog.held_bytes == 100


def test_backlog_counts_waiting_messages_per_task_through_every_way_in_and_out():
    """`waiting_tasks` (which kinds of task a dispatch pass looks for) always matches the queue."""
    import collections
    import random

    rng = random.Random(7)
    backlog = Backlog(ordered=True)
    backlog.task_caps["capped"] = 2
    serial = 0
    for _ in range(3000):
        op = rng.choice(["enqueue", "enqueue", "next", "batch", "unget", "hold_key", "take_where", "finish", "take_all"])
        if op == "enqueue":
            serial += 1
            m = InFlight(
                f"ack{serial}",
                Message(f"m{serial}", b"x", {}, None, None, rng.choice(["", "A", "B"]), "s"),
                rng.choice(["t", "u", "capped"]),
                1,
                0.0,
            )
            backlog.enqueue(m)
        elif op == "next" and (m := backlog.next_ready(0.0)) is not None:
            backlog.finished(m) if rng.random() < 0.5 else backlog.unget([m])
        elif op == "batch":
            taken = backlog.take_batch(rng.choice(["t", "u"]), rng.randint(0, 4), 0.0)
            backlog.unget(taken) if rng.random() < 0.5 else [backlog.finished(m) for m in taken]
        elif op == "hold_key":
            backlog.hold_key(rng.choice(["A", "B"]), until=0.0)
        elif op == "take_where":
            backlog.take_where(lambda m: m.message.message_id.endswith("3"))
        elif op == "take_all" and rng.random() < 0.05:
            backlog.take_all()
        assert backlog.waiting_tasks == collections.Counter(m.task for m in backlog.waiting), op
    assert serial > 500

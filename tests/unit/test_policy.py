import pytest

from consumerd.policy.backoff import Backoff
from consumerd.policy.flow import pull_size


def test_backoff_ceiling_doubles_then_caps():
    backoff = Backoff(base=0.5, cap=5.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.ceiling(10_000) == 5.0  # no overflow for huge attempt counts
    assert backoff.ceiling(0) == 0.5


def test_backoff_full_jitter_spans_zero_to_ceiling():
    backoff = Backoff(base=1.0, cap=60.0)
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0
    assert backoff.delay(3, rand=lambda: 0.5) == 2.0
    assert backoff.delay(3, rand=lambda: 0.999) == pytest.approx(3.996)


@pytest.mark.parametrize(
    ("concurrency", "busy", "buffered", "requested", "prefetch", "expected"),
    [
        (4, 0, 0, 0, 0, 4),  # idle: one long-poll for every slot
        (4, 4, 0, 0, 0, 0),  # full: pull nothing
        (4, 1, 0, 1, 0, 2),
        (4, 1, 1, 1, 0, 0),  # one still queued and only 1 of 4 free: wait for a fuller pull
        (4, 0, 1, 0, 0, 3),  # half the room free: pull
        (4, 4, 0, 0, 2, 2),  # prefetch lets a couple wait ahead of the workers
        (500, 0, 0, 0, 0, 100),  # one pull returns at most 100
        (2, 3, 0, 0, 0, 0),  # never negative (shrinking pool)
    ],
)
def test_pull_size(concurrency, busy, buffered, requested, prefetch, expected):
    assert pull_size(concurrency, busy, buffered, requested, prefetch=prefetch) == expected


def test_prefetch_holds_only_what_the_pool_starts_within_the_horizon():
    from consumerd.policy.flow import prefetch_allowance

    assert prefetch_allowance(4, None) == 0  # nothing known yet: hold nothing extra
    assert prefetch_allowance(4, 0.001) == 100  # very short tasks: capped
    assert prefetch_allowance(2, 0.02) == 100  # 20 ms tasks on 2 workers: capped (two seconds' worth is 200)
    assert prefetch_allowance(8, 0.25) == 64
    assert prefetch_allowance(8, 1.0) == 16
    assert prefetch_allowance(8, 2.0) == 0  # long tasks: none wait here while others could run them
    assert prefetch_allowance(64, 2.5) == 0


def test_ewma_follows_samples():
    from consumerd.policy.flow import Ewma

    ewma = Ewma(alpha=0.5)
    assert ewma.value is None
    ewma.add(1.0)
    ewma.add(3.0)
    assert ewma.value == 2.0

import pytest

from consumerd.backoff import Backoff
from consumerd.flow import pull_size


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
        (4, 1, 1, 1, 0, 1),
        (4, 4, 0, 0, 2, 2),  # prefetch lets a couple wait ahead of the workers
        (500, 0, 0, 0, 0, 100),  # one pull returns at most 100
        (2, 3, 0, 0, 0, 0),  # never negative (shrinking pool)
    ],
)
def test_pull_size(concurrency, busy, buffered, requested, prefetch, expected):
    assert pull_size(concurrency, busy, buffered, requested, prefetch=prefetch) == expected

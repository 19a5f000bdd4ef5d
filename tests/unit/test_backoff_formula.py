"""One backoff formula: Backoff (the I/O threads) and RetryPolicy (message retries) both use policy.backoff."""

import itertools

import pytest

from consumerd.policy.backoff import Backoff, capped_exponential, jittered
from consumerd.policy.delivery import RETRY_DOUBLINGS, RetryPolicy, clamp_delay

ATTEMPTS = (-3, 0, 1, 2, 3, 4, 5, 7, 10, 11, 20, 30, 31, 32, 40, 62, 63, 64, 100, 10_000)
RANDS = (0.0, 0.25, 0.5, 0.999999)
BOUNDS = ((1.0, 600.0), (10.0, 600.0), (0.5, 30.0), (0.0, 0.0), (0.0, 600.0), (5e-7, 600.0), (1e-9, 600.0), (600.0, 600.0), (3.0, 3.0))


@pytest.mark.parametrize(("low", "high"), BOUNDS)
def test_retry_policy_delays_are_the_shared_formula(low, high):
    policy = RetryPolicy(low, high)
    for attempt, r in itertools.product(ATTEMPTS, RANDS):
        shared = clamp_delay(jittered(low, capped_exponential(low, high, attempt, RETRY_DOUBLINGS), lambda r=r: r))
        # The same numbers written out: floor + jitter up to min(max, min * 2**min(n - 1, 30)), whole seconds.
        written_out = clamp_delay(low + r * (min(high, low * 2.0 ** min(max(attempt, 1) - 1, 30)) - low))
        assert policy.delay(attempt, rand=lambda r=r: r) == shared == written_out, (low, high, attempt, r)


@pytest.mark.parametrize(("base", "cap"), ((0.1, 10.0), (0.2, 10.0), (0.5, 5.0), (1.0, 60.0), (1e-12, 10.0)))
def test_backoff_delays_are_the_shared_formula_with_full_jitter(base, cap):
    backoff = Backoff(base, cap)
    for attempt, r in itertools.product(ATTEMPTS, RANDS):
        written_out = r * min(cap, base * (2.0 ** min(max(attempt, 1) - 1, 62)))
        assert backoff.ceiling(attempt) == capped_exponential(base, cap, attempt)
        assert backoff.delay(attempt, rand=lambda r=r: r) == jittered(0.0, backoff.ceiling(attempt), lambda r=r: r) == written_out


def test_the_ceiling_stops_doubling_after_the_limit():
    assert capped_exponential(1.0, float("inf"), 4, doublings=2) == 4.0
    assert capped_exponential(1e-9, 600.0, 100, doublings=RETRY_DOUBLINGS) == pytest.approx(1e-9 * 2**30)
    assert capped_exponential(1e-9, 600.0, 100) == 600.0

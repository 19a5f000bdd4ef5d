"""Pure retry policy: capped exponential backoff with full jitter (the AWS architecture blog's)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

MAX_DOUBLINGS = 62  # 2**62 times any base is already far past any cap


def capped_exponential(base: float, cap: float, attempt: int, doublings: int = MAX_DOUBLINGS) -> float:
    """Upper bound of the delay before retry ``attempt`` (1 = the first retry): ``base`` doubled
    for each earlier retry, at most ``doublings`` times, and never above ``cap``."""
    exponent = min(max(attempt, 1) - 1, doublings)
    return min(cap, base * (2.0**exponent))


def jittered(low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """A delay uniformly drawn from [low, high]: retries of many clients spread out."""
    return low + rand() * (high - low)


@dataclasses.dataclass(frozen=True)
class Backoff:
    base: float = 0.1
    cap: float = 10.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry ``attempt`` (1 = the first retry)."""
        return capped_exponential(self.base, self.cap, attempt)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A delay uniformly drawn from [0, ceiling] (full jitter)."""
        return jittered(0.0, self.ceiling(attempt), rand)

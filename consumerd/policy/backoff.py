"""Pure retry policy: capped exponential backoff with full jitter (the AWS architecture blog's)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Backoff:
    base: float = 0.1
    cap: float = 10.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry ``attempt`` (1 = the first retry)."""
        exponent = min(max(attempt, 1) - 1, 62)  # 2**62 is already far past any cap
        return min(self.cap, self.base * (2.0**exponent))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A delay uniformly drawn from [0, ceiling]: retries of many clients spread out."""
        return rand() * self.ceiling(attempt)

"""Pure: how long tasks take, as a histogram of whole seconds, for the adaptive lease length.

Like python-pubsub's ack-latency histogram: durations are clamped to [minimum, maximum] seconds and
the lease length is their 99th percentile, so a lease fits how long tasks really run: short tasks
give short leases (a crashed host's messages come back quickly), long tasks long ones (fewer
renewals).
"""

from __future__ import annotations

import math
from collections import Counter


class Histogram:
    def __init__(self, minimum: int = 10, maximum: int = 600) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError("need 0 < minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self._counts: Counter[int] = Counter()
        self.samples = 0

    def set_bounds(self, minimum: int, maximum: int) -> None:
        """New clamps for samples from now on (a reload); samples already counted stay as they were."""
        if not 0 < minimum <= maximum:
            raise ValueError("need 0 < minimum <= maximum")
        self.minimum, self.maximum = minimum, maximum

    def add(self, seconds: float) -> None:
        bucket = min(self.maximum, max(self.minimum, math.ceil(seconds)))
        self._counts[bucket] += 1
        self.samples += 1

    def percentile(self, percent: float) -> int:
        """The smallest bucket at or below which ``percent`` % of samples fall; ``minimum`` when empty."""
        if not self.samples:
            return self.minimum
        target = self.samples * percent / 100
        seen = 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if seen >= target:
                return bucket
        return self.maximum

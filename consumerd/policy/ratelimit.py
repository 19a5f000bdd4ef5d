"""Rate limits: how many messages of a task may start per second, as a token bucket per task.

Pure: every method takes `now` (seconds of a monotonic clock) and reads no clock itself, so the
supervisor can ask "may this message start now?" (`allow`) and, when not, "when may it?"
(`wait_until`), and sleep until then instead of polling.

How the steady rate is held. Tokens are floats: a bucket gains ``rate.per_second`` tokens per second
of ``now``, up to its capacity, and a message is admitted only while a whole token is there, taking
it. The deficit carries over exactly (a token is due ``1 / rate`` after the last one, not after the
tick that noticed it), so over any interval of T seconds at most ``capacity + rate * T`` messages
start: the long-run rate never exceeds the limit, and tends to it while messages keep waiting. The
capacity is one second's tokens (at least 1): a bucket starts full, so the first second (and the
first after an idle spell) may start up to ``capacity`` messages at once; "600/m" is 10/s smoothed,
never 600 at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Protocol

from consumerd.ipc.records import MAX_RATE_LIMIT

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_UNITS = {seconds: unit for unit, seconds in PERIODS.items()}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")
EXAMPLES = '"20/s", "1.5/s", "600/m" or "100/h"'
EPSILON = 1e-9  # tokens: float error in the refill maths never delays a token that is due


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """``count`` messages per ``period`` seconds: "20/s" is Rate(20, 1), "600/m" is Rate(600, 60)."""

    count: float
    period: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Rate:
        """A rate as written in `@task(rate_limit=...)` and `[tasks] rate_limits`; ValueError otherwise."""
        match = _RATE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{text!r} is not a rate: a number of messages per second, minute or hour, such as {EXAMPLES}")
        rate = cls(float(match.group(1)), PERIODS[match.group(2)])
        if not 0 < rate.per_second <= MAX_RATE_LIMIT:
            raise ValueError(f"{text!r}: a rate must be more than 0 and at most {MAX_RATE_LIMIT:g}/s")
        return rate

    @classmethod
    def of(cls, per_second: float) -> Rate:
        """The rate `TaskOptions.rate_limit` carries (messages per second), in the unit that reads best:
        per second from 1/s up, else per minute or per hour, whole numbers first ("100/h", not "1.67/m")."""
        if per_second >= 1:
            return cls(per_second)
        fitting = [cls(per_second * period, period) for period in (60.0, 3600.0) if per_second * period >= 1 - EPSILON]
        whole = [rate for rate in fitting if math.isclose(rate.count, round(rate.count), rel_tol=1e-9)]
        return (whole or fitting or [cls(per_second * 3600.0, 3600.0)])[0]

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def share(self, hosts: int) -> Rate:
        """One host's part of this rate when ``hosts`` share it evenly."""
        return Rate(self.count / hosts, self.period)

    def same_as(self, other: Rate) -> bool:
        """The same limit however written ("60/m" and "1/s" are)."""
        return math.isclose(self.per_second, other.per_second, rel_tol=1e-12)

    def __str__(self) -> str:
        unit = _UNITS.get(self.period)
        return f"{self.count:g}/{unit}" if unit else f"{self.per_second:g}/s"


class TokenBucket:
    """One task's tokens on this host: at most ``capacity``, refilled at ``rate``, one per message."""

    def __init__(self, rate: Rate, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate.per_second)
        self._tokens = self.capacity  # starts full: see the module's docstring
        self._updated: float | None = None  # the `now` the tokens were counted at

    def tokens(self, now: float) -> float:
        """The tokens the bucket holds at ``now`` (a fraction of one is on its way)."""
        if self._updated is None or now <= self._updated:
            return self._tokens
        return min(self.capacity, self._tokens + (now - self._updated) * self.rate.per_second)

    def take(self, now: float) -> bool:
        """Take a token for one message starting at ``now``; False (nothing taken) when none is there."""
        tokens = self.tokens(now)
        self._updated = now if self._updated is None else max(now, self._updated)
        self._tokens = tokens
        if tokens < 1 - EPSILON:
            return False
        self._tokens = tokens - 1
        return True

    def next_token_at(self, now: float) -> float:
        """When `take` will next succeed: ``now`` when a token is there already."""
        missing = 1 - self.tokens(now)
        return now if missing <= EPSILON else max(now, self._updated or now) + missing / self.rate.per_second

    def retuned(self, rate: Rate) -> TokenBucket:
        """This bucket at another rate: it keeps the tokens it holds, up to the new capacity, so a
        reload that changes a rate grants no burst."""
        bucket = TokenBucket(rate)
        bucket._tokens = min(self._tokens, bucket.capacity)
        bucket._updated = self._updated
        return bucket


class Limiter(Protocol):
    """What the supervisor asks of its rate limits: `RateLimits` on one host, or
    `adapters.ratelimit.FleetRateLimits` across a fleet (which also has `on_answer`, `start`, `stop`)."""

    def configure(self, limits: Mapping[str, Rate], hosts: int = 1) -> None: ...

    def __contains__(self, task: object) -> bool: ...

    def allow(self, task: str, now: float) -> bool: ...

    def wait_until(self, task: str, now: float) -> float | None: ...


class RateLimits:
    """The rate-limited tasks of this host and their buckets; a task not listed is never held back.

    ``hosts``: how many hosts share each limit evenly, so each bucket holds ``rate / hosts``
    (`[rate_limit] hosts`; 1 = the limit is this host's alone).
    """

    def __init__(self, limits: Mapping[str, Rate] | None = None, hosts: int = 1) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self.configure(limits or {}, hosts)

    def configure(self, limits: Mapping[str, Rate], hosts: int = 1) -> None:
        """Apply the limits at start-up and on every reload: a task whose limit is unchanged keeps its
        bucket (its tokens and when they were counted); a changed one keeps its tokens up to the new
        capacity; a task no longer listed is no longer limited."""
        if hosts < 1:
            raise ValueError(f"hosts must be at least 1, not {hosts}")
        buckets = {}
        for task, rate in limits.items():
            share, bucket = rate.share(hosts), self._buckets.get(task)
            if bucket is None:
                bucket = TokenBucket(share)
            elif not bucket.rate.same_as(share):
                bucket = bucket.retuned(share)
            buckets[task] = bucket
        self._buckets = buckets

    def __contains__(self, task: object) -> bool:
        """Whether ``task`` is rate-limited here."""
        return task in self._buckets

    def rate_of(self, task: str) -> Rate | None:
        """This host's limit for ``task`` (its share), or None."""
        bucket = self._buckets.get(task)
        return bucket.rate if bucket is not None else None

    def allow(self, task: str, now: float) -> bool:
        """May one message of ``task`` start at ``now``? True takes its token: ask only for a message
        that will then start. A task without a limit is always allowed."""
        bucket = self._buckets.get(task)
        return bucket is None or bucket.take(now)

    def wait_until(self, task: str, now: float) -> float | None:
        """When a message of ``task`` may start (``now`` when it may already); None for a task
        without a limit, which never waits."""
        bucket = self._buckets.get(task)
        return bucket.next_token_at(now) if bucket is not None else None


def limits_of(declared: Mapping[str, float | None], configured: Mapping[str, str]) -> dict[str, Rate]:
    """Each task's limit: ``configured`` (`[tasks] rate_limits`, text) over ``declared``
    (`@task(rate_limit=...)`, messages per second as `TaskOptions.rate_limit` carries it)."""
    limits = {task: Rate.of(per_second) for task, per_second in declared.items() if per_second is not None}
    limits.update({task: Rate.parse(text) for task, text in configured.items()})
    return limits

"""Rate limits as the loop applies them: one limiter for the host, every subscription's messages.

A message of a limited task starts only with a token (`allow`, which takes it); without one it
stays in its backlog, leased and renewed, taking no worker, while other tasks' messages overtake it
(`Intake.dispatch` skips the task for the rest of the pass). The limiter is the host's token
buckets, or with `[rate_limit] redis` the fleet's, asked by a thread whose answers come back through
an inbox of their own: the loop never waits for Redis.
"""

from __future__ import annotations

import contextlib
import math
import selectors

from consumerd.adapters.prometheus import MetricsSink
from consumerd.adapters.ratelimit import FleetRateLimits, RateAnswer, RedisGcra
from consumerd.config import Settings
from consumerd.ipc.held import InFlight
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.records import TaskOptions
from consumerd.policy.ratelimit import Limiter, RateLimits, limits_of

HELD_SECONDS = 2.0


class Throttle:
    def __init__(self, settings: Settings, metrics: MetricsSink) -> None:
        self.metrics = metrics
        self.inbox = Inbox()
        self.fleet: FleetRateLimits | None = None
        self.limiter: Limiter = RateLimits()
        config = settings.rate_limit
        if config.redis:
            store = RedisGcra(config.redis, config.timeout)  # ConfigError without the redis extra
            self.fleet = FleetRateLimits(store, self.inbox, metrics, key_prefix=config.key_prefix, timeout=config.timeout)
            self.limiter = self.fleet
        self.declared: dict[str, float | None] = {}
        self.rates: dict[str, float] = {}  # task -> its limit, messages per second

    def start(self, selector: selectors.BaseSelector, resources: contextlib.ExitStack) -> None:
        if self.fleet is not None:
            self.fleet.start()
            resources.callback(self.fleet.stop)
            selector.register(self.inbox.fd, selectors.EVENT_READ, lambda: None)  # read in `collect`

    def set_tasks(self, tasks: dict[str, TaskOptions], settings: Settings) -> None:
        """The limits `@task(rate_limit=...)` declares, `[tasks] rate_limits` over them."""
        self.declared = {name: options.rate_limit for name, options in tasks.items()}
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        limits = limits_of(self.declared, settings.tasks.rate_limits)
        self.rates = {task: rate.per_second for task, rate in limits.items()}
        self.limiter.configure(limits, settings.rate_limit.hosts)

    def in_hand(self, task: str) -> int:
        """How many waiting messages of a limited task a pull looks past: HELD_SECONDS of its rate."""
        return max(1, math.ceil(HELD_SECONDS * self.rates.get(task, 0.0)))

    def collect(self, now: float) -> None:
        if self.fleet is not None:
            for answer in self.inbox.take_all():
                if isinstance(answer, RateAnswer):
                    self.fleet.on_answer(answer, now)

    def limits(self, task: str) -> bool:
        return task in self.limiter

    def admit(self, inflight: InFlight, now: float) -> bool:
        """May this message start now (a worker is free for it)? True takes its token and records
        how long it waited since it was pulled."""
        if inflight.task not in self.limiter:
            return True
        if not self.limiter.allow(inflight.task, now):
            return False
        self.metrics.rate_limit_waited(inflight.task, max(0.0, now - inflight.received_at))
        return True

    def still_waiting(self, tasks: set[str], now: float) -> set[str]:
        """Those of ``tasks`` (that found no token) whose next token is not due at ``now``: a pass
        skips their messages; the others are tried again."""
        return {task for task in tasks if (due := self.limiter.wait_until(task, now)) is not None and due > now}

    def due(self, tasks: set[str], now: float) -> float | None:
        """When a token is next due for one of ``tasks`` (those that found none)."""
        times = [t for t in (self.limiter.wait_until(task, now) for task in tasks) if t is not None]
        return min(times, default=None)

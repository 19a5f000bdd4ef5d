"""The safety net: an unexpected exception while handling one event fails that event's message only.

The message is given back with its retry delay, the error is logged as `daemon.error` with its
traceback, and the loop goes on. More than `limit` such errors within `window` seconds means a bug,
not bad luck: `on_exhausted` is called (the supervisor stops in a controlled way, exit 70).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence

from structlog.stdlib import BoundLogger

from consumerd.ipc.held import InFlight
from consumerd.supervisor.settler import Counters, Settler


class ErrorBudget:
    """More than ``limit`` internal errors within ``window`` seconds means a bug, not bad luck."""

    def __init__(self, limit: int = 5, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def spend(self, now: float) -> bool:
        """Record one error at ``now``; True once the budget is exceeded."""
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        return len(self._times) > self.limit


class SafetyNet:
    def __init__(
        self,
        settler_of: Callable[[InFlight], Settler],
        counters: Counters,
        log: BoundLogger,
        clock: Callable[[], float],
        on_exhausted: Callable[[str], None],
        budget: ErrorBudget | None = None,
    ) -> None:
        self.settler_of = settler_of  # the settler of the message's own subscription
        self.counters = counters
        self.log = log
        self.clock = clock
        self.on_exhausted = on_exhausted
        self.budget = budget or ErrorBudget()

    @contextlib.contextmanager
    def guard(self, during: str, held: InFlight | Sequence[InFlight] | None = None) -> Iterator[None]:
        """Run the block; if it raises, log it and give back ``held`` (the message or messages it
        was handling) with their retry delay."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - logged with its traceback; the budget ends real bugs
            self.caught(during, exc, held)

    def caught(self, during: str, exc: Exception, held: InFlight | Sequence[InFlight] | None) -> None:
        now = self.clock()
        self.counters.internal_errors += 1
        messages = [held] if isinstance(held, InFlight) else list(held or ())
        message_id = messages[0].message.message_id if messages else None
        self.log.error("daemon.error", during=during, message_id=message_id, error=f"{type(exc).__name__}: {exc}"[:500], exc_info=exc)
        for inflight in messages:
            try:
                self.settler_of(inflight).abandon(inflight, now)
            except Exception as again:  # noqa: BLE001 - its lease runs out: Pub/Sub redelivers it
                self.log.error("daemon.error", during="abandon", message_id=inflight.message.message_id, error=repr(again)[:500])
        if self.budget.spend(now):
            self.on_exhausted(f"{self.budget.limit + 1} internal errors within {self.budget.window:g}s (last: {type(exc).__name__})")

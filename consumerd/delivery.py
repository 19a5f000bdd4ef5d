"""Pure delivery policy: what happens to a message given how its attempt ended.

`decide` maps an outcome to acking, retrying after a delay, or dead-lettering. No I/O, no clock;
randomness is passed in, so every rule here is unit-tested directly.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Literal

MAX_DELAY = 600  # Pub/Sub's ceiling for an ack deadline, hence for a retry delay

# How an attempt ended, as the supervisor reports it.
SUCCESS = "success"
ERROR = "error"  # the task raised
CRASH = "crash"  # its worker died
TIMEOUT = "timeout"  # killed at task_timeout
RETRY = "retry"  # the task raised Retry(after=...)
REJECT = "reject"  # the task raised Reject (or a PayloadError)
UNKNOWN_TASK = "unknown_task"
TOO_LARGE = "too_large"
INTERRUPTED = "interrupted"  # we stopped it (shutdown): not the task's doing
SHUTDOWN = "shutdown"

FAILURES = frozenset({ERROR, CRASH, TIMEOUT})
POISON = frozenset({REJECT, UNKNOWN_TASK, TOO_LARGE})
OURS = frozenset({INTERRUPTED, SHUTDOWN})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    min_backoff: float = 1.0
    max_backoff: float = 600.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> int:
        """Exponential in the attempt number, full jitter above the floor: [min, min * 2**(n-1)]."""
        ceiling = min(self.max_backoff, self.min_backoff * 2.0 ** min(max(attempt, 1) - 1, 30))
        return _clamp(self.min_backoff + rand() * (ceiling - self.min_backoff))


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Literal["ack", "retry", "dead_letter"]
    delay: int = 0  # seconds until it comes back (retry)
    reason: str = ""


def decide(
    outcome: str,
    attempt: int,
    policy: RetryPolicy,
    *,
    dead_letter: bool,
    max_attempts: int = 0,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Decision:
    if outcome == SUCCESS:
        return Decision("ack")
    if outcome in OURS:
        return Decision("retry", 0, "given back at once for another consumer")
    if outcome in POISON:
        if dead_letter:
            return Decision("dead_letter", reason=outcome)
        return Decision("retry", _clamp(policy.max_backoff), f"{outcome} and no dead-letter topic: maximum backoff")
    if max_attempts and attempt >= max_attempts:
        if dead_letter:
            return Decision("dead_letter", reason=f"{attempt} attempts (dead_letter.max_attempts = {max_attempts})")
    if outcome == RETRY and retry_after is not None:
        return Decision("retry", _clamp(retry_after), "the task asked for it")
    return Decision("retry", policy.delay(attempt, rand))


def _clamp(seconds: float) -> int:
    return int(min(MAX_DELAY, max(0, round(seconds))))

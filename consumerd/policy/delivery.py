"""Pure delivery policy: what happens to a message given how its attempt ended.

`decide` maps an outcome to acking, retrying after a delay, or dead-lettering. No I/O, no clock;
randomness is passed in, so every rule here is unit-tested directly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable

from consumerd.ipc.records import Outcome, is_number
from consumerd.policy.backoff import capped_exponential, jittered

MAX_DELAY = 600  # Pub/Sub's ceiling for an ack deadline, hence for a retry delay
RETRY_DOUBLINGS = 30  # past 2**30 times min_backoff, a retry waits no longer

FAILURES = frozenset({Outcome.ERROR, Outcome.CRASH, Outcome.TIMEOUT})
POISON = frozenset({Outcome.REJECT, Outcome.UNKNOWN_TASK, Outcome.TOO_LARGE})
OURS = frozenset({Outcome.INTERRUPTED, Outcome.SHUTDOWN})


class Action(enum.StrEnum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    min_backoff: float = 1.0
    max_backoff: float = 600.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> int:
        """Exponential in the attempt number, full jitter above the floor: [min, min * 2**(n-1)]."""
        ceiling = capped_exponential(self.min_backoff, self.max_backoff, attempt, RETRY_DOUBLINGS)
        return clamp_delay(jittered(self.min_backoff, ceiling, rand))


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    delay: int = 0  # seconds until it comes back (retry)
    reason: str = ""


def valid_retry_after(value: object) -> bool:
    """A delay a task may ask for: a finite number >= 0 (it is capped at MAX_DELAY later)."""
    return is_number(value) and value >= 0


def decide(
    outcome: Outcome,
    attempt: int,
    policy: RetryPolicy,
    *,
    dead_letter: bool,
    max_attempts: int = 0,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Decision:
    if outcome is Outcome.SUCCESS:
        return Decision(Action.ACK)
    if outcome in OURS:
        return Decision(Action.RETRY, 0, "given back at once for another consumer")
    if outcome in POISON:
        if dead_letter:
            return Decision(Action.DEAD_LETTER, reason=outcome.value)
        return Decision(Action.RETRY, clamp_delay(policy.max_backoff), f"{outcome} and no dead-letter topic: maximum backoff")
    if max_attempts and attempt >= max_attempts and dead_letter:
        return Decision(Action.DEAD_LETTER, reason=f"{attempt} attempts (dead_letter.max_attempts = {max_attempts})")
    if outcome is Outcome.RETRY and retry_after is not None and valid_retry_after(retry_after):
        return Decision(Action.RETRY, clamp_delay(retry_after), "the task asked for it")
    return Decision(Action.RETRY, policy.delay(attempt, rand))


def clamp_delay(seconds: float) -> int:
    """Whole seconds in 0..MAX_DELAY; a value that is not a finite number means the longest delay."""
    if not math.isfinite(seconds):
        return MAX_DELAY
    return int(min(MAX_DELAY, max(0, round(seconds))))

"""Pure admission triage: what happens to a message the moment it is pulled. No I/O, no clock.

`triage` returns a verdict; the supervisor acts on it (queue it, settle it as poison, give it back).
`AttemptCounter` counts deliveries locally when Pub/Sub does not (no dead-letter policy).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Mapping

from consumerd.ipc.records import Outcome

ATTEMPTS_REMEMBERED = 100_000  # local delivery counts kept at most
ATTEMPTS_FORGOTTEN_AFTER = 3600.0  # seconds unseen: longer than any retry delay (600 s) plus a lease


class Verdict(enum.StrEnum):
    QUEUE = "queue"  # wait for a worker
    GIVE_BACK = "give_back"  # we are not running (draining): nack, no attempt used
    KEY_HELD = "key_held"  # its ordering key waits for an earlier message's retry: give back with the delay
    POISON = "poison"  # settle now with `outcome` (dead-letter or maximum backoff)


@dataclasses.dataclass(frozen=True)
class Admission:
    verdict: Verdict
    outcome: Outcome | None = None  # with POISON
    error: str = ""  # with POISON: why
    delay: float = 0.0  # with KEY_HELD: seconds the key is still held


@dataclasses.dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 0  # 0 = no limit
    max_attempts: int = 0  # 0 = no limit


def triage(
    *,
    running: bool,
    task: str,
    known_tasks: frozenset[str],
    unknown_reason: str,
    size: int,
    attempt: int,
    key_held_for: float,
    limits: Limits,
) -> Admission:
    """The fate of a message as it arrives, in order of precedence."""
    if not running:
        return Admission(Verdict.GIVE_BACK)
    if task not in known_tasks:
        return Admission(Verdict.POISON, Outcome.UNKNOWN_TASK, unknown_reason)
    if limits.max_message_bytes and size > limits.max_message_bytes:
        return Admission(Verdict.POISON, Outcome.TOO_LARGE, f"{size} bytes > flow.max_message_bytes {limits.max_message_bytes}")
    if limits.max_attempts and attempt > limits.max_attempts:
        return Admission(Verdict.POISON, Outcome.REJECT, f"attempt {attempt} > dead_letter.max_attempts {limits.max_attempts}")
    if key_held_for > 0:
        return Admission(Verdict.KEY_HELD, delay=key_held_for)
    return Admission(Verdict.QUEUE)


@dataclasses.dataclass(frozen=True)
class Router:
    """Which task a message is for: its route attribute, else [tasks] default."""

    attribute: str
    default: str

    def route(self, attributes: Mapping[str, str]) -> str:
        return attributes.get(self.attribute) or self.default

    def unknown_reason(self, attributes: Mapping[str, str], known: frozenset[str]) -> str:
        if self.attribute not in attributes and not self.default:
            return f"no {self.attribute!r} attribute and no tasks.default"
        return f"no task named {self.route(attributes)!r} (known: {', '.join(sorted(known))})"


class AttemptCounter:
    """Deliveries per message id seen by this process, bounded in count and age."""

    def __init__(self, capacity: int = ATTEMPTS_REMEMBERED, forget_after: float = ATTEMPTS_FORGOTTEN_AFTER) -> None:
        self.capacity = capacity
        self.forget_after = forget_after
        self._seen: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()  # id -> (count, last seen)

    def __len__(self) -> int:
        return len(self._seen)

    def count(self, message_id: str, delivery_attempt: int | None, now: float) -> int:
        """This delivery's attempt number: Pub/Sub's when it counts, else ours."""
        if delivery_attempt:
            return delivery_attempt
        count = self._seen.pop(message_id, (0, now))[0] + 1
        self._seen[message_id] = (count, now)
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return count

    def forget(self, message_id: str) -> None:
        """The message succeeded or left for good: its count no longer matters."""
        self._seen.pop(message_id, None)

    def prune(self, now: float) -> int:
        """Drop counts not seen for ``forget_after`` seconds (oldest first); returns how many."""
        dropped = 0
        while self._seen:
            message_id, (_, seen) = next(iter(self._seen.items()))
            if now - seen < self.forget_after:
                break
            del self._seen[message_id]
            dropped += 1
        return dropped

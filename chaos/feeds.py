"""The topics the soak publishes to and the subscriptions one daemon serves them from.

With one, the soak is what it was before [[subscriptions]]: `jobs` as pubsub.subscription. With
more, jobs-1, jobs-2, ... share the daemon's worker pool by weight, the messages are dealt to them in
the same ratio (so each keeps a backlog for most of the soak and the fair share is at work
throughout), and each but the first has a dead-letter topic of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PROJECT = "chaos"
FIRST_WEIGHT = 3  # the first subscription's weight; the others have 1, and messages split alike


@dataclasses.dataclass(frozen=True)
class Feed:
    """One topic the soak publishes to and the subscription the daemon serves it from, with the
    dead-letter topic its rejects go to (and a subscription the soak reads them back from)."""

    name: str  # the subscription's short name, as the ledger records it
    weight: int
    own_dead_letter: bool  # its [[subscriptions]] entry sets dead_letter.topic; else [dead_letter]'s

    @property
    def topic(self) -> str:
        return f"projects/{PROJECT}/topics/{self.name}"

    @property
    def subscription(self) -> str:
        return f"projects/{PROJECT}/subscriptions/{self.name}"

    @property
    def dead_topic(self) -> str:
        return f"projects/{PROJECT}/topics/{self.name}-dead"

    @property
    def dead_subscription(self) -> str:
        return f"projects/{PROJECT}/subscriptions/{self.name}-dead"

    def entry(self) -> dict[str, Any]:
        """Its [[subscriptions]] table."""
        own = {"dead_letter": {"topic": self.dead_topic}} if self.own_dead_letter else {}
        return {"name": self.subscription, "weight": self.weight, **own}


def feeds(count: int) -> list[Feed]:
    """One: the `jobs` subscription as pubsub.subscription. More: jobs-1 (weight FIRST_WEIGHT, the
    global [dead_letter] topic), jobs-2, ... (weight 1, each its own dead-letter topic)."""
    if count == 1:
        return [Feed("jobs", 1, own_dead_letter=False)]
    return [Feed(f"jobs-{i + 1}", FIRST_WEIGHT if i == 0 else 1, own_dead_letter=i > 0) for i in range(count)]


def split(n: int, weights: list[int]) -> list[int]:
    """``n`` in parts by ``weights`` (the first takes what rounding leaves)."""
    parts = [n * w // sum(weights) for w in weights]
    parts[0] += n - sum(parts)
    return parts

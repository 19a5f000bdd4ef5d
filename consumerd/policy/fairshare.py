"""Which subscription's message starts next on the shared pool: a weighted fair share (pure).

Each subscription with messages waiting is offered the next free worker slot in turn, lowest
``(running + 1) / weight`` first: with every subscription busy, their running counts settle at the
ratio of their weights; one with nothing waiting is not in the race, so its share goes to the
others (it lends it) and comes back the moment a message of its own arrives, whatever the backlog of
the others. A subscription at its `max_concurrency`, or whose next message found no worker this
pass, sits the pass out. Ties go to the one served least recently, so equal weights alternate.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Share:
    weight: int
    cap: int = 0  # max_concurrency; 0: none
    running: int = 0  # its messages on workers now (running or queued on one)
    served_at: int = 0  # the pass counter when it last started a message

    def eligible(self) -> bool:
        return not self.cap or self.running < self.cap

    def load(self) -> float:
        return (self.running + 1) / self.weight


def next_turn(shares: dict[str, Share], waiting: set[str]) -> str | None:
    """The subscription whose message should start next, among those with messages ``waiting``."""
    candidates = [name for name in waiting if name in shares and shares[name].eligible()]
    if not candidates:
        return None
    return min(candidates, key=lambda name: (shares[name].load(), shares[name].served_at, name))

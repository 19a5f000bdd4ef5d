"""Pure flow control: how many messages the supervisor may pull right now."""

from __future__ import annotations


def pull_size(
    concurrency: int, busy: int, buffered: int, requested: int, *, prefetch: int = 0, max_per_pull: int = 100
) -> int:
    """How many messages to ask for now: free slots not already covered by a pull in flight.

    ``prefetch`` allows that many messages to wait in the supervisor beyond the free workers, so a
    worker that frees never waits for a pull round trip; 0 holds only what can start at once.
    """
    free = concurrency + prefetch - busy - buffered - requested
    return max(0, min(free, max_per_pull))

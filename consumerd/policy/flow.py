"""Pure flow control: how many messages the supervisor may pull right now."""

from __future__ import annotations


def pull_size(concurrency: int, busy: int, buffered: int, requested: int, *, prefetch: int = 0, max_per_pull: int = 100) -> int:
    """How many messages to ask for now: free slots not already covered by a pull in flight.

    ``prefetch`` allows that many messages to wait in the supervisor beyond the free workers, so a
    worker that frees never waits for a pull round trip; 0 holds only what can start at once. While
    messages are still queued, a pull waits until half the room is free: fewer, fuller pulls.
    """
    target = concurrency + prefetch
    free = target - busy - buffered - requested
    if buffered and free < min(max_per_pull, target) // 2:
        return 0  # workers still have messages queued here: wait to fill a fuller pull (fewer RPCs)
    return max(0, min(free, max_per_pull))


def prefetch_allowance(concurrency: int, mean_task_seconds: float | None, horizon: float = 2.0, cap: int = 100) -> int:
    """Messages that may wait beyond the free workers: as many as the pool starts within ``horizon``.

    Short tasks get a deep buffer (no worker waits on a pull round trip, and pulls come fewer and
    fuller: each RPC costs Pub/Sub, and the emulator on the bench's own cores, far more than a
    message in it); tasks as long as the horizon get none, so no message sits leased here while
    other consumers could run it. Unknown duration: none.
    """
    if mean_task_seconds is None or mean_task_seconds >= horizon:
        return 0
    return min(cap, int(concurrency * horizon / max(mean_task_seconds, 1e-4)))


class Ewma:
    """Exponentially weighted moving average of task durations; None until the first sample."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)

"""Pure bookkeeping of the messages the supervisor holds: which may start next, and their bytes.

A message waits here from the pull until a worker takes it. The next to start is the oldest that
is eligible: with ordering, its ordering key has nothing running and is not held back after a
failure; with a byte budget, it fits beside what is running (a single message always may run,
however large, so nothing is stuck). No I/O and no clock: `now` is passed in.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection

from consumerd.ipc.held import InFlight


class Backlog:
    def __init__(self, ordered: bool = False, max_running_bytes: int = 0) -> None:
        self.ordered = ordered
        self.max_running_bytes = max_running_bytes  # 0 = no byte budget
        self.waiting: collections.deque[InFlight] = collections.deque()
        self.running_keys: set[str] = set()
        self.blocked_until: dict[str, float] = {}
        self.running_bytes = 0
        self.task_caps: dict[str, int] = {}  # @task(concurrency=N): at most N of that task running
        self.running_tasks: collections.Counter[str] = collections.Counter()
        self.held_bytes = 0  # waiting + running (+ being dead-lettered, + outputs being published, until released)
        self.waiting_tasks: collections.Counter[str] = collections.Counter()  # task -> messages waiting
        self._running = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def configure(
        self, *, ordered: bool | None = None, max_running_bytes: int | None = None, task_caps: dict[str, int] | None = None
    ) -> None:
        """What is known only later: the subscription's ordering, a reloaded byte budget, the tasks' caps."""
        if ordered is not None:
            self.ordered = ordered
        if max_running_bytes is not None:
            self.max_running_bytes = max_running_bytes
        if task_caps is not None:
            self.task_caps = task_caps

    def hold(self, inflight: InFlight) -> None:
        """The supervisor now holds this message (its bytes count until `released`)."""
        self.held_bytes += inflight.size

    def enqueue(self, inflight: InFlight) -> None:
        """A held message waits for a worker."""
        self.waiting.append(inflight)
        self.waiting_tasks[inflight.task] += 1

    def next_ready(self, now: float, skip: Collection[str] = ()) -> InFlight | None:
        """Remove and return the oldest message that may start now, or None; messages of the tasks
        in ``skip`` (waiting for a rate limit) are passed over."""
        for index, inflight in enumerate(self.waiting):
            if not self._fits(inflight):
                return None  # keep arrival order: nothing overtakes a big message waiting for room
            if inflight.task not in skip and self._task_free(inflight.task) and self._key_free(inflight.key, now):
                del self.waiting[index]
                self._unwait([inflight])
                self._started(inflight)
                return inflight
        return None

    def take_batch(self, task: str, n: int, now: float) -> list[InFlight]:
        """Remove and return up to ``n`` more messages of ``task`` that may start now (a batch)."""
        taken: list[InFlight] = []
        if n <= 0:
            return taken
        kept: collections.deque[InFlight] = collections.deque()
        for inflight in self.waiting:
            if (
                len(taken) < n
                and inflight.task == task
                and self._fits(inflight)
                and self._task_free(task)
                and self._key_free(inflight.key, now)
            ):
                self._started(inflight)
                taken.append(inflight)
            else:
                kept.append(inflight)
        if taken:
            self.waiting = kept
            self._unwait(taken)
        return taken

    def unget(self, items: list[InFlight]) -> None:
        """Put messages `next_ready`/`take_batch` returned back at the front, in their order: they
        could not start after all (no worker free for them, a batch still filling)."""
        for inflight in reversed(items):
            self.finished(inflight)
            self.waiting.appendleft(inflight)
            self.waiting_tasks[inflight.task] += 1

    def _unwait(self, taken: list[InFlight]) -> None:
        for inflight in taken:
            self.waiting_tasks[inflight.task] -= 1
            if self.waiting_tasks[inflight.task] <= 0:
                del self.waiting_tasks[inflight.task]

    def running_count(self) -> int:
        """Messages started and not finished (on a worker, or queued behind a running one)."""
        return self._running

    def _started(self, inflight: InFlight) -> None:
        self._running += 1
        self.running_bytes += inflight.size
        self.running_tasks[inflight.task] += 1
        if self.ordered and inflight.key:
            self.running_keys.add(inflight.key)

    def _fits(self, inflight: InFlight) -> bool:
        if not self.max_running_bytes or not self.running_bytes:
            return True
        return self.running_bytes + inflight.size <= self.max_running_bytes

    def _task_free(self, task: str) -> bool:
        cap = self.task_caps.get(task)
        return cap is None or self.running_tasks[task] < cap

    def _key_free(self, key: str, now: float) -> bool:
        if not (self.ordered and key):
            return True
        if key in self.running_keys:
            return False
        until = self.blocked_until.get(key)
        if until is not None and now < until:
            return False
        self.blocked_until.pop(key, None)
        return True

    def finished(self, inflight: InFlight) -> None:
        """A started message is done running (whatever its fate)."""
        self._running -= 1
        self.running_bytes -= inflight.size
        self.running_keys.discard(inflight.key)
        self.running_tasks[inflight.task] -= 1
        if self.running_tasks[inflight.task] <= 0:
            del self.running_tasks[inflight.task]

    def released(self, inflight: InFlight) -> None:
        """The supervisor no longer holds the message (acked, given back, forwarded)."""
        self.held_bytes -= inflight.size

    def publishing(self, size: int) -> None:
        """Outputs of a finished task weigh like a running message until Pub/Sub accepted them."""
        self.running_bytes += size
        self.held_bytes += size

    def published(self, size: int) -> None:
        self.running_bytes -= size
        self.held_bytes -= size

    def hold_key(self, key: str, until: float) -> list[InFlight]:
        """After a failure on ``key``: nothing of that key starts before ``until``.

        Returns the waiting messages of the key, removed: the caller gives them back with the
        same delay, so Pub/Sub hands the key's messages out again in order after the retry.
        """
        if not (self.ordered and key):
            return []
        self.blocked_until[key] = until
        taken = [m for m in self.waiting if m.key == key]
        self.waiting = collections.deque(m for m in self.waiting if m.key != key)
        self._unwait(taken)
        return taken

    def key_blocked_for(self, key: str, now: float) -> float:
        """Seconds ``key`` is still held back (0 if not)."""
        if not (self.ordered and key):
            return 0.0
        return max(0.0, self.blocked_until.get(key, now) - now)

    def take_where(self, predicate: Callable[[InFlight], bool]) -> list[InFlight]:
        """Remove and return the waiting messages ``predicate`` picks (their order kept)."""
        taken = [m for m in self.waiting if predicate(m)]
        if taken:
            self.waiting = collections.deque(m for m in self.waiting if not predicate(m))
            self._unwait(taken)
        return taken

    def prune(self, now: float) -> int:
        """Forget ordering-key holds that ended (housekeeping); returns how many were dropped."""
        ended = [key for key, until in self.blocked_until.items() if until <= now]
        for key in ended:
            del self.blocked_until[key]
        return len(ended)

    def take_all(self) -> list[InFlight]:
        taken = list(self.waiting)
        self.waiting.clear()
        self.waiting_tasks.clear()
        return taken

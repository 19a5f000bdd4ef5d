"""A thread that long-polls Pub/Sub for as many messages as the supervisor has room for.

The supervisor's loop never blocks on an RPC: it asks for N messages with `request(n)` and hears
back through its inbox (a queue plus a wake-up pipe it selects on). Failed pulls are
retried with capped, jittered backoff, logged once per retry; the thread recovers by itself.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping

import structlog
from structlog.stdlib import BoundLogger

from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff


@dataclasses.dataclass(frozen=True)
class PullResult:
    asked: int
    received: list  # list[client.Received]; typed loosely so this module needs no google import
    sent_at: float = float("-inf")  # time.monotonic() when the pull that answered was sent


class Puller:
    def __init__(
        self,
        pull: Callable[[int, float], list],
        inbox: Inbox,
        is_transient: Callable[[BaseException], bool],
        timeout: float,  # pubsub.pull_timeout: an empty long poll returns after about this long
        backoff: Backoff = Backoff(base=0.2, cap=10.0),
        labels: Mapping[str, str] | None = None,  # on every log line: the subscription it serves
    ) -> None:
        self._pull = pull
        self._inbox = inbox
        self._is_transient = is_transient
        self._backoff = backoff
        self._timeout = timeout
        self._cond = threading.Condition()
        self._wanted = 0
        self.last_error = ""  # the last pull's failure; empty once one succeeds
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="consumerd-puller", daemon=True)
        self.log: BoundLogger = structlog.get_logger("consumerd.puller").bind(**(labels or {}))

    def start(self) -> None:
        self._thread.start()

    def request(self, n: int) -> None:
        """Pull up to ``n`` messages (one pull at a time; call again after its result arrived)."""
        with self._cond:
            self._wanted = n
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted > 0 or self._stopping)
                if self._stopping:
                    return
                asked, self._wanted = self._wanted, 0
            sent_at, received = self._pull_with_retry(asked)
            if received is None:
                return
            self._inbox.post(PullResult(asked, received, sent_at))

    def _pull_with_retry(self, asked: int) -> tuple[float, list | None]:
        attempt = 0
        while not self._stopping:
            sent_at = time.monotonic()
            try:
                received = self._pull(asked, self._timeout)
                self.last_error = ""
                if attempt:
                    self.log.info("pubsub.pull_recovered", after_attempts=attempt)
                return sent_at, received
            except Exception as exc:  # noqa: BLE001 - every failure is retried; the loop must live on
                if self._stopping:
                    return sent_at, None
                attempt += 1
                self.last_error = _describe(exc)  # read by the readiness probe: one str assignment
                delay = self._backoff.delay(attempt)
                level = "warning" if self._is_transient(exc) else "error"
                getattr(self.log, level)("pubsub.pull_failed", error=_describe(exc), attempt=attempt, retry_in_s=round(delay, 3))
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
        return 0.0, None


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]

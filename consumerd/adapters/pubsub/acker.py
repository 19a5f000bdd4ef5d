"""A thread that sends acks and modacks in batches, retrying transient failures.

The supervisor hands over `ack(ids)` and `modack(ids, seconds)` (seconds = 0 is a nack) and goes
on. Requests queued while an RPC is in flight are merged into the next one, so acks batch by
themselves under load. A later request for an ack id replaces an earlier one still waiting (an ack
after a renewal, say). Transient failures are retried with backoff until they succeed or the
request is older than `give_up_after` (the lease is long gone: Pub/Sub redelivers the message).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import structlog
from structlog.stdlib import BoundLogger

from consumerd.policy.backoff import Backoff

ACK = -1  # marker in place of a deadline: acknowledge


@dataclasses.dataclass(frozen=True)
class _Request:
    ack_ids: tuple[str, ...]
    seconds: int  # ACK, 0 (nack) or an extension


class Acker:
    def __init__(
        self,
        ack: Callable[[Sequence[str]], dict[str, str] | None],
        modack: Callable[[Sequence[str], int], dict[str, str] | None],
        is_transient: Callable[[BaseException], bool],
        backoff: Backoff = Backoff(base=0.1, cap=5.0),
        give_up_after: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        linger: float = 1.0,
        max_batch: int = 1000,
        labels: Mapping[str, str] | None = None,  # on every log line: the subscription it serves
    ) -> None:
        # Seconds to wait for more requests before sending: fewer, fuller RPCs, which cost Pub/Sub
        # and the supervisor less per message. An ack sent that much later holds its lease that much
        # longer (leases are renewed with >= 4 s to spare, so it never lapses meanwhile), and a
        # daemon killed outright within it gets those messages again; a drain's flush() does not wait.
        self._linger = linger
        self._max_batch = max_batch
        self._ack = ack
        self._modack = modack
        self._is_transient = is_transient
        self._backoff = backoff
        self._give_up_after = give_up_after
        self._clock = clock
        self._queue: queue.SimpleQueue[_Request | threading.Event | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[int, float]] = {}  # ack id -> (seconds, first queued at)
        self._flush_waiters: list[threading.Event] = []
        self._hurry = threading.Event()  # cuts a linger short: a flush, a stop, a full batch
        self._count_lock = threading.Lock()
        self._queued_ids = 0  # ack ids put since the linger's clock was reset
        self._thread = threading.Thread(target=self._run, name="consumerd-acker", daemon=True)
        self.stats = {"acked": 0, "nacked": 0, "extended": 0, "dropped": 0, "rpc_failures": 0, "ack_id_failures": 0}
        self.log: BoundLogger = structlog.get_logger("consumerd.acker").bind(**(labels or {}))

    def start(self) -> None:
        self._thread.start()

    def ack(self, ack_ids: Sequence[str]) -> None:
        self._put(ack_ids, ACK)

    def modack(self, ack_ids: Sequence[str], seconds: int) -> None:
        self._put(ack_ids, seconds)

    def _put(self, ack_ids: Sequence[str], seconds: int) -> None:
        if ack_ids:
            self._queue.put(_Request(tuple(ack_ids), seconds))
            with self._count_lock:
                self._queued_ids += len(ack_ids)
                if self._queued_ids >= self._max_batch:
                    self._hurry.set()  # a full RPC's worth is waiting: send it now

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before this call was sent (or given up); False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        self._hurry.set()
        return done.wait(timeout)

    def stop(self) -> None:
        self._queue.put(None)
        self._hurry.set()

    def _run(self) -> None:
        failures = 0
        while True:
            wait = self._backoff.delay(failures) if failures else None
            if not self._collect(wait):
                return
            if self._pending:
                failures = failures + 1 if self._send_pending() else 0
            if not self._pending:
                for waiter in self._flush_waiters:
                    waiter.set()
                self._flush_waiters.clear()

    def _collect(self, wait: float | None) -> bool:
        """Merge queued requests into pending; False when told to stop.

        With nothing pending it blocks for the first request, then lingers briefly for more so
        that acks of tasks finishing close together share one RPC. It lingers on `_hurry`, not on
        the queue: a request that arrives meanwhile does not wake this thread (one wake-up per RPC,
        not per message, and no GIL hand-off in the supervisor's loop for each ack).
        """
        block = not self._pending or wait is not None
        with self._count_lock:
            self._hurry.clear()  # before the get: a flush, a stop or a full batch from now on cuts the linger short
            self._queued_ids = 0
        try:
            first = self._queue.get(timeout=wait) if block else self._queue.get_nowait()
        except queue.Empty:
            return True
        if isinstance(first, _Request):
            self._hurry.wait(self._linger)
        for request in [first, *self._drain()]:
            if request is None:
                return False
            if isinstance(request, threading.Event):
                self._flush_waiters.append(request)
            else:
                self._merge(request)
        return True

    def _drain(self) -> list[_Request | threading.Event | None]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _merge(self, request: _Request) -> None:
        now = self._clock()
        for ack_id in request.ack_ids:
            previous = self._pending.get(ack_id)
            self._pending[ack_id] = (request.seconds, previous[1] if previous else now)

    def _send_pending(self) -> bool:
        """One RPC per kind of request; return True if any failed transiently (back off, retry)."""
        groups: dict[int, list[str]] = defaultdict(list)
        for ack_id, (seconds, _) in self._pending.items():
            groups[seconds].append(ack_id)
        retry = False
        for seconds, ack_ids in groups.items():
            retry |= self._send(ack_ids, seconds)
        return retry

    def _send(self, ack_ids: list[str], seconds: int) -> bool:
        try:
            failures = (self._ack(ack_ids) if seconds == ACK else self._modack(ack_ids, seconds)) or {}
        except Exception as exc:  # noqa: BLE001 - classified below; the thread must live on
            self.stats["rpc_failures"] += 1
            if self._is_transient(exc):
                self.log.warning("pubsub.ack_retry", op=_op(seconds), count=len(ack_ids), error=type(exc).__name__)
                self._give_up_stale(ack_ids, seconds)
                return True
            self.log.error("pubsub.ack_failed", op=_op(seconds), count=len(ack_ids), error=f"{type(exc).__name__}: {exc}"[:300])
            self._forget(ack_ids, seconds, dropped=True)
            return False
        self._forget([a for a in ack_ids if a not in failures], seconds, dropped=False)
        return self._handle_ack_id_failures(failures, seconds)

    def _handle_ack_id_failures(self, failures: dict[str, str], seconds: int) -> bool:
        """Exactly-once subscriptions report ack ids one by one: retry the transient, drop the rest."""
        if not failures:
            return False
        self.stats["ack_id_failures"] += len(failures)
        permanent = [a for a, why in failures.items() if not why.startswith("TRANSIENT_")]
        if permanent:
            # The lease was lost (expired, or the message was already acked): Pub/Sub may deliver
            # it again. Nothing more to do here but say so.
            reasons = sorted({failures[a] for a in permanent})
            self.log.error("pubsub.ack_id_failed", op=_op(seconds), count=len(permanent), reasons=reasons)
            self._forget(permanent, seconds, dropped=True)
        transient = [a for a in failures if a not in permanent]
        if transient:
            self._give_up_stale(transient, seconds)
        return bool(transient)

    def _forget(self, ack_ids: list[str], seconds: int, dropped: bool) -> None:
        for ack_id in ack_ids:
            if self._pending.get(ack_id, (None,))[0] == seconds:
                del self._pending[ack_id]
        key = "dropped" if dropped else {ACK: "acked", 0: "nacked"}.get(seconds, "extended")
        self.stats[key] += len(ack_ids)

    def _give_up_stale(self, ack_ids: list[str], seconds: int) -> None:
        now = self._clock()
        stale = [a for a in ack_ids if now - self._pending[a][1] > self._give_up_after]
        if stale:
            self.log.error("pubsub.ack_gave_up", op=_op(seconds), count=len(stale))
            self._forget(stale, seconds, dropped=True)


def _op(seconds: int) -> str:
    return {ACK: "ack", 0: "nack"}.get(seconds, "modack")

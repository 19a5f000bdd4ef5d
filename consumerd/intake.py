"""The way in for messages: received -> held -> triaged -> queued -> started on an idle worker.

Also sizes the next pull. Policy comes from pure modules (`admission.triage`, `flow.pull_size`);
what becomes of a message that cannot run is the `Settler`'s call. Unexpected exceptions while
handling one message go to `on_error` with that message, so the supervisor's safety net can give it
back without the loop ever seeing the exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from . import admission
from .admission import Router, Verdict
from .backlog import Backlog, InFlight
from .config import Settings
from .flow import Ewma, prefetch_allowance, pull_size
from .pool import Pool
from .protocol import TaskOptions
from .pubsub import Received
from .settler import Settler

# A tick this late means the loop did not run (SIGSTOP, a VM pause; it wakes at least once a second):
# look for lapsed leases, and date what a pull brought meanwhile from when the stall began.
STALL = 2.0
PRUNE_INTERVAL = 10.0  # seconds between prunes of ordering-key holds and attempt counts
MAX_FORWARDING = 1000  # dead-letter copies in flight before pulling waits for the forwarder
OnError = Callable[[str, Exception, InFlight | None], None]


class Intake:
    def __init__(self, settings: Settings, settler: Settler, backlog: Backlog, on_error: OnError) -> None:
        self.settings = settings  # replaced on reload
        self.settler = settler
        self.backlog = backlog
        self.on_error = on_error
        self.attempts = settler.attempts
        self.router = Router(settings.tasks.route_attribute, settings.tasks.default)
        self.task_names: frozenset[str] = frozenset()  # known once the fork server imported the modules
        self.lease_deadline = 10  # the subscription's ack deadline: what a pulled message holds
        self.requested = 0  # messages asked of the pull in flight
        self.task_seconds = Ewma()  # how long tasks take: sizes the prefetch buffer
        self._next_prune = 0.0
        self._last_tick = float("inf")  # set by the first tick
        self._stall: tuple[float, float] | None = None  # the last time the loop did not run: (start, end)

    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        """The tasks the fork server found, with their `@task(...)` options (kept across reloads)."""
        self.task_names = frozenset(tasks)
        self.settler.task_options = tasks  # the one copy: timeouts are read from it too
        self.backlog.task_caps = {name: o.concurrency for name, o in tasks.items() if o.concurrency}

    def timeout_of(self, task: str) -> float:
        options = self.settler.task_options.get(task)
        return options.timeout if options and options.timeout is not None else self.settings.workers.task_timeout

    # -- in ----------------------------------------------------------------------------------
    def ticked(self, now: float) -> None:
        """The loop ran at ``now``; a gap longer than STALL since the last tick was a stall."""
        if now - self._last_tick > STALL:
            self._stall = (self._last_tick, now)
        self._last_tick = now

    def lease_start(self, sent_at: float, now: float) -> float:
        """When a pull's leases began: if it was outstanding while the loop stalled, the stall's start."""
        if self._stall is None or sent_at > self._stall[1]:
            return now
        return max(sent_at, self._stall[0])

    def pulled(self, asked: int, received: list[Received], now: float, running: bool, sent_at: float = float("inf")) -> None:
        """A pull's messages; ``sent_at`` is when that pull was sent (its answer may have come while the
        loop was frozen: then the leases are dated from the freeze)."""
        self.requested -= asked
        received_at = self.lease_start(sent_at, now)
        for item in received:
            inflight = None
            try:
                inflight = self.receive(item, received_at)
                self.admit(inflight, now, running)
            except Exception as exc:  # noqa: BLE001 - the safety net, with this message to give back
                self.on_error("admit", exc, inflight)

    def receive(self, received: Received, now: float) -> InFlight:
        message = received.message
        if self.settings.tasks.idempotency_attribute:
            message = dataclasses.replace(message, key_attribute=self.settings.tasks.idempotency_attribute)
        attempt = self.attempts.count(message.message_id, message.delivery_attempt, now)
        inflight = InFlight(received.ack_id, message, self.router.route(message.attributes), attempt, now)
        self.settler.hold(inflight, now, self.lease_deadline)
        self.settler.metrics.received(attempt)
        return inflight

    def admit(self, inflight: InFlight, now: float, running: bool) -> None:
        verdict = admission.triage(
            running=running,
            task=inflight.task,
            known_tasks=self.task_names,
            unknown_reason=self.router.unknown_reason(inflight.message.attributes, self.task_names),
            size=inflight.size,
            attempt=inflight.attempt,
            key_held_for=self.backlog.key_blocked_for(inflight.key, now),
            limits=admission.Limits(self.settings.flow.max_message_bytes, self.settler.max_attempts_of(inflight.task)),
        )
        if verdict.verdict is Verdict.QUEUE:
            self.backlog.enqueue(inflight)
        elif verdict.verdict is Verdict.POISON:
            assert verdict.outcome is not None
            self.settler.settle(inflight, verdict.outcome, now, error=verdict.error)
        else:  # GIVE_BACK, KEY_HELD
            self.settler.give_back(inflight, delay=verdict.delay)

    # -- out to workers --------------------------------------------------------------------
    def dispatch(self, pool: Pool, now: float) -> None:
        """Start what may start on the idle workers; drop what lapsed while it waited."""
        idle = pool.idle_workers()
        while idle and (inflight := self.backlog.next_ready(now)) is not None:
            try:
                if self.settler.lapsed(inflight, now):
                    self.backlog.finished(inflight)  # it never ran: frees its key and bytes
                    self.settler.drop_lapsed(inflight, now)
                else:
                    pool.assign(idle.pop(), inflight, self.timeout_of(inflight.task), now)
            except Exception as exc:  # noqa: BLE001 - the safety net, with this message to give back
                self.on_error("dispatch", exc, inflight)

    def drop_lapsed(self, now: float) -> int:
        """After the loop was frozen: drop every waiting message whose lease ran out meanwhile, before
        a renewal could make it look alive again (Pub/Sub has redelivered it; running it is a duplicate)."""
        lapsed = self.backlog.take_where(lambda inflight: self.settler.lapsed(inflight, now))
        for inflight in lapsed:
            self.settler.drop_lapsed(inflight, now)
        return len(lapsed)

    def next_pull(self, concurrency: int, busy: int) -> int:
        """How many messages to ask for now (0: none). The caller sends the request."""
        forwarding = len(self.settler.forwarding)
        if self.requested or forwarding >= MAX_FORWARDING:
            return 0  # one pull at a time; and no more poison while the forwarder is this far behind
        budget = self.settings.flow.max_inflight_bytes
        if budget and self.backlog.held_bytes >= budget:
            return 0  # the byte budget is spent: pull again when messages are done
        prefetch = prefetch_allowance(concurrency, self.task_seconds.value)
        # Copies being dead-lettered hold leases too: they count as busy.
        n = pull_size(concurrency, busy + forwarding, len(self.backlog), self.requested, prefetch=prefetch)
        self.requested += n
        return n

    def prune(self, now: float) -> None:
        """Forget ended ordering-key holds and stale attempt counts, every PRUNE_INTERVAL."""
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self.backlog.prune(now)
            self.attempts.prune(now)

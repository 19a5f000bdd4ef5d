"""The way in for messages: received -> held -> triaged -> queued -> started on an idle worker.

Also sizes the next pull. Policy comes from pure modules (`admission.triage`, `flow.pull_size`);
what becomes of a message that cannot run is the `Settler`'s call. Unexpected exceptions while
handling one message go to `on_error` with that message, so the supervisor's safety net can give it
back without the loop ever seeing the exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from consumerd.adapters.pubsub.client import Received
from consumerd.config import Settings
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import TaskOptions
from consumerd.policy import admission
from consumerd.policy.admission import Router, Verdict
from consumerd.policy.backlog import Backlog
from consumerd.policy.flow import Ewma, prefetch_allowance, pull_size
from consumerd.pool.handles import Mode, WorkerHandle
from consumerd.pool.pool import Pool
from consumerd.supervisor.settler import Settler
from consumerd.supervisor.throttle import Throttle

# A tick this late means the loop did not run (SIGSTOP, a VM pause; it wakes at least once a second):
# look for lapsed leases, and date what a pull brought meanwhile from when the stall began.
STALL = 2.0
PRUNE_INTERVAL = 10.0  # seconds between prunes of ordering-key holds and attempt counts
MAX_FORWARDING = 1000  # dead-letter copies in flight before pulling waits for the forwarder
# Sync jobs queued behind the running one, per worker: as many as run in QUEUE_HORIZON seconds
# (at least one, so a worker never waits for its next job), at most MAX_QUEUED. None behind tasks
# longer than PIPELINE_UP_TO seconds (or of unknown length): the ~0.1 ms a queued job saves is
# nothing beside them, and a queued message would wait leased here, and hold up a drain, as long.
# The horizon must outlast one slow pass of the loop (a pull to admit, a burst of results), or
# workers of short tasks run dry and wait while the loop catches up.
QUEUE_HORIZON = 0.01
MAX_QUEUED = 64
PIPELINE_UP_TO = 1.0
# Pulls are sized for coroutines or batches only while such messages arrive: a batch task that is
# merely loaded must not make every pull fetch batch-sized backlogs of other tasks.
SHAPE_MEMORY = 10.0
OnError = Callable[[str, Exception, InFlight | None], None]


class Intake:
    def __init__(
        self,
        settings: Settings,
        settler: Settler,
        backlog: Backlog,
        on_error: OnError,
        throttle: Throttle,
        task_seconds: Ewma,
    ) -> None:
        self.settings = settings  # replaced on reload
        self.settler = settler
        self.backlog = backlog
        self.on_error = on_error
        self.throttle = throttle  # the host's rate limits, shared by every subscription
        self.throttled: set[str] = set()  # limited tasks whose next message found no token in the last pass
        self.router = Router(settings.tasks.route_attribute, settings.tasks.default)
        self.task_names: frozenset[str] = frozenset()  # known once the fork server imported the modules
        self.lease_deadline = 10  # the subscription's ack deadline: what a pulled message holds
        self.requested = 0  # messages asked of the pull in flight
        # How long tasks take (sizes the prefetch and the queue behind a running job): the pool's, shared
        # by every subscription, so a quiet one knows what its first message may queue behind.
        self.task_seconds = task_seconds
        self._next_prune = 0.0
        self._last_tick = float("inf")  # set by the first tick
        self._stall: tuple[float, float] | None = None  # the last time the loop did not run: (start, end)
        self.modes: frozenset[Mode] = frozenset({Mode.SYNC})  # what kinds of task exist
        self.batch_due: float | None = None  # when a batch that is still filling must go anyway
        self.shaped_seen: dict[str, float] = {}  # async or batch task -> when a message of it last came

    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        """The tasks the fork server found, with their `@task(...)` options (kept across reloads)."""
        self.task_names = frozenset(tasks)
        self.settler.set_tasks(tasks)  # the one copy of the options: ask the settler for them
        # A batch task's concurrency counts calls: that many batches at once.
        self.backlog.configure(task_caps={name: o.concurrency * o.batch for name, o in tasks.items() if o.concurrency})
        self.modes = frozenset(Mode.ASYNC if o.is_async else Mode.SYNC for o in tasks.values()) or frozenset({Mode.SYNC})

    def apply(self, settings: Settings) -> None:
        """A reload: messages pulled from now on are sized, admitted and timed by ``settings``."""
        self.settings = settings

    def subscribed(self, ack_deadline: int) -> None:
        """The subscription's ack deadline: how long a pulled message is leased before a renewal."""
        self.lease_deadline = ack_deadline

    def next_batch_due(self) -> float | None:
        """When a batch that is still filling must go anyway (None: none is filling)."""
        return self.batch_due

    def next_token_due(self, now: float) -> float | None:
        """When a rate-limited task that found no token may have one (None: none is waiting)."""
        return self.throttle.due(self.throttled, now) if self.throttled else None

    def task_ran(self, seconds: float) -> None:
        self.task_seconds.add(seconds)

    def options_of(self, task: str) -> TaskOptions:
        return self.settler.options_of(task)

    def timeout_of(self, task: str) -> float:
        timeout = self.options_of(task).timeout
        return timeout if timeout is not None else self.settings.workers.task_timeout

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
        attempt = self.settler.attempt_of(message.message_id, message.delivery_attempt, now)
        inflight = InFlight(received.ack_id, message, self.router.route(message.attributes), attempt, now)
        options = self.options_of(inflight.task)
        if options.is_async or options.batch_size:
            self.shaped_seen[inflight.task] = now
        self.settler.hold(inflight, now, self.lease_deadline)
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
    def dispatch(self, pool: Pool, now: float, limit: int = 0) -> int:
        """Start what may start, oldest first (at most ``limit`` calls; 0: no limit): on an idle
        worker, queued behind a running sync job, or as one more coroutine; drop what lapsed while it
        waited. What finds no worker waits for the next pass, and keeps the other kind of task from
        taking the worker it needs. Returns the calls started; the caller flushes the pool."""
        started = 0
        deferred: list[InFlight] = []
        self.throttled = self.throttle.still_waiting(self.throttled, now)  # those whose token is not due yet
        blocked: set[Mode] = set()
        self.batch_due = None
        # Only the kinds of task that have messages waiting: once they all found no worker, the
        # rest of the backlog need not be looked at (a pass stays O(started), not O(backlog)).
        waiting = {Mode.ASYNC if self.options_of(task).is_async else Mode.SYNC for task in self.backlog.waiting_tasks}
        while (
            not waiting <= blocked
            and not (limit and started >= limit)
            and (inflight := self.backlog.next_ready(now, skip=self.throttled)) is not None
        ):
            try:
                if self.settler.lapsed(inflight, now):
                    self.backlog.finished(inflight)  # it never ran: frees its key and bytes
                    self.settler.drop_lapsed(inflight, now)
                    continue
                options = self.options_of(inflight.task)
                mode = Mode.ASYNC if options.is_async else Mode.SYNC
                worker = None if mode in blocked else self.pick(pool, mode, blocked)
                if worker is None:
                    blocked.add(mode)
                    deferred.append(inflight)
                    continue
                if not self.throttle.admit(inflight, now):  # no token yet: it waits here, others overtake it
                    self.throttled.add(inflight.task)
                    deferred.append(inflight)
                    continue
                unit = [inflight]
                if options.batch_size:
                    unit += self.backlog.take_batch(inflight.task, options.batch_size - 1, now)
                    if len(unit) < options.batch_size and now < (due := inflight.received_at + (options.batch_wait or 0.0)):
                        self.batch_due = due if self.batch_due is None else min(self.batch_due, due)
                        deferred += unit  # still filling: the next pull may complete it
                        continue
                pool.assign(worker, unit, mode, self.timeout_of(inflight.task), now, batch=bool(options.batch_size))
                started += 1
            except Exception as exc:  # noqa: BLE001 - the safety net, with this message to give back
                self.on_error("dispatch", exc, inflight)
        self.backlog.unget(deferred)
        return started

    def pick(self, pool: Pool, mode: Mode, blocked: set[Mode]) -> WorkerHandle | None:
        """The worker the pool finds with the most room for a call of ``mode``. While the other kind
        waits for a worker, sync jobs go to idle workers only and one async worker takes no more
        coroutines, so a worker frees up for it; a sync job that finds none while async tasks exist
        has a worker reserved for sync work."""
        if mode is Mode.ASYNC:
            depth = self.settings.workers.async_concurrency
        else:
            depth = 1 if Mode.ASYNC in blocked else 1 + self.queue_depth()
        return pool.pick(mode, depth, reserve=mode is Mode.SYNC and Mode.ASYNC in self.modes)

    def queue_depth(self) -> int:
        """Sync jobs to queue behind a worker's running one: ~QUEUE_HORIZON seconds of work."""
        mean = self.task_seconds.value
        if mean is None or mean > PIPELINE_UP_TO:
            return 0
        return max(1, min(MAX_QUEUED, int(QUEUE_HORIZON / max(mean, 1e-6))))

    def worker_capacity(self, now: float = 0.0) -> int:
        """Messages one worker may hold at once, for sizing pulls: a pipeline of short jobs, or (while
        their messages come, SHAPE_MEMORY) its coroutines, or two batches (one running, one queued)."""
        capacity = 1 + self.queue_depth()
        for task, seen in list(self.shaped_seen.items()):
            if now - seen > SHAPE_MEMORY:
                del self.shaped_seen[task]
                continue
            options = self.options_of(task)
            capacity = max(capacity, self.settings.workers.async_concurrency if options.is_async else 2 * options.batch)
        return capacity

    def requeue(self, unstarted: list[InFlight], running: bool) -> None:
        """Messages a dead worker never started: first in line again, untouched (still leased here,
        no attempt used); given back instead when we are stopping."""
        self.backlog.unget(unstarted)
        if not running:
            for inflight in self.backlog.take_where(lambda m: m in unstarted):
                self.settler.give_back(inflight)

    def drop_lapsed(self, now: float) -> int:
        """After the loop was frozen: drop every waiting message whose lease ran out meanwhile, before
        a renewal could make it look alive again (Pub/Sub has redelivered it; running it is a duplicate)."""
        lapsed = self.backlog.take_where(lambda inflight: self.settler.lapsed(inflight, now))
        for inflight in lapsed:
            self.settler.drop_lapsed(inflight, now)
        return len(lapsed)

    def next_pull(self, concurrency: int, busy: int, now: float = 0.0) -> int:
        """How many messages to ask for now (0: none), for ``concurrency`` workers holding ``busy``
        messages. The caller sends the request."""
        forwarding = self.settler.publishing()
        if self.requested or forwarding >= MAX_FORWARDING:
            return 0  # one pull at a time; and no more poison while the forwarder is this far behind
        budget = self.settings.flow.max_inflight_bytes
        if budget and self.backlog.held_bytes >= budget:
            return 0  # the byte budget is spent: pull again when messages are done
        prefetch = prefetch_allowance(concurrency, self.task_seconds.value)
        per_worker = self.worker_capacity(now)
        # Copies being dead-lettered hold leases too: they count as busy. A pull brings 200 (at most
        # 1,000 for coroutines or batches): an RPC costs Pub/Sub more than the messages in it.
        n = pull_size(
            concurrency * per_worker,
            busy + forwarding,
            len(self.backlog) - self.waiting_for_tokens(),
            self.requested,
            prefetch=prefetch,
            max_per_pull=min(1000, max(200, per_worker)),
        )
        self.requested += n
        return n

    def waiting_for_tokens(self) -> int:
        """Messages of rate-limited tasks waiting for a token, up to a couple of seconds of their
        rate: a pull looks past them (the subscription's other tasks still come in); beyond
        that they count as work in hand, so one host does not hoard what other hosts could run."""
        return sum(min(self.backlog.waiting_tasks[task], self.throttle.in_hand(task)) for task in self.throttled)

    def prune(self, now: float) -> None:
        """Forget ended ordering-key holds and stale attempt counts, every PRUNE_INTERVAL."""
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self.backlog.prune(now)
            self.settler.prune(now)

"""The fate of every message the supervisor holds: ack, retry later, dead-letter, give back, drop.

Built from three callables (`ack`, `modack`, `forward`) and pure policy, so it is tested with
recording fakes and plain numbers for `now`. One verb per meaning:
- `settle`: an attempt ended (or never could start): ack on success only, else retry later or
  forward to the dead-letter topic, by `delivery.decide`.
- `give_back`: nack a message that never started (draining, a held ordering key): no attempt used.
- `drop_lapsed`: its lease ran out while it waited here (the loop was frozen); Pub/Sub has handed it
  to another consumer, so it is neither run, acked nor nacked.
- `abandon`: the safety net's way out for a message whose handling raised: retry after its delay.
It also keeps the leases alive (`renew_leases`) and decides their length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from structlog.stdlib import BoundLogger

from consumerd.adapters.prometheus import MetricsSink, NullMetrics
from consumerd.adapters.pubsub.forwarder import DeadLetter, Forwarded
from consumerd.adapters.pubsub.publisher import OutputsPublished
from consumerd.config import Settings
from consumerd.ipc.held import InFlight
from consumerd.ipc.outputs import PublishRules
from consumerd.ipc.records import Outcome, Result, TaskOptions
from consumerd.policy import deadletter, delivery
from consumerd.policy.admission import AttemptCounter
from consumerd.policy.backlog import Backlog
from consumerd.policy.delivery import Action, RetryPolicy
from consumerd.policy.histogram import Histogram
from consumerd.policy.leases import LeaseSchedule
from consumerd.pool.handles import Lost
from consumerd.supervisor.components import IoThreads
from consumerd.supervisor.outputs import OutputRelay

NO_OPTIONS = TaskOptions()
ADAPTIVE_MIN_SAMPLES = 10  # finished tasks before the lease length follows their durations


@dataclasses.dataclass
class Counters:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    nacked_unstarted: int = 0
    lease_lapsed: int = 0
    dead_letter_failed: int = 0
    internal_errors: int = 0


@dataclasses.dataclass(frozen=True)
class SettlePolicy:
    retry: RetryPolicy
    max_attempts: int  # dead_letter.max_attempts; 0 = none
    ack_deadline: int  # leases.ack_deadline: the lease length until durations are known
    adaptive: bool  # leases.adaptive

    @classmethod
    def of(cls, settings: Settings) -> SettlePolicy:
        return cls(
            retry=RetryPolicy(settings.retry.min_backoff, settings.retry.max_backoff),
            max_attempts=settings.dead_letter.max_attempts,
            ack_deadline=settings.leases.ack_deadline,
            adaptive=settings.leases.adaptive,
        )


class Settler:
    def __init__(
        self,
        ack: Callable[[Sequence[str]], None],
        modack: Callable[[Sequence[str], int], None],
        forward: Callable[[DeadLetter], None] | None,
        *,
        relay: OutputRelay | None = None,
        policy: SettlePolicy,
        leases: LeaseSchedule,
        backlog: Backlog,
        durations: Histogram,
        attempts: AttemptCounter,
        counters: Counters,
        log: BoundLogger,
        metrics: MetricsSink | None = None,
    ) -> None:
        self._ack = ack
        self._modack = modack
        self._forward = forward
        self.policy = policy
        self.leases = leases
        self.backlog = backlog
        self.durations = durations
        self.attempts = attempts
        self.log = log
        self.counters = counters
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.task_options: dict[str, TaskOptions] = {}  # per-task overrides of the policy (@task options)
        self.forwarding: dict[str, InFlight] = {}  # ack id -> message being copied to the dead-letter topic
        self.relay = relay if relay is not None else OutputRelay(None, PublishRules(), backlog)  # outputs being published

    @classmethod
    def of(cls, settings: Settings, io: IoThreads, backlog: Backlog, counters: Counters, log: BoundLogger, metrics: MetricsSink) -> Settler:
        """A settler for ``settings`` that acks, renews and publishes through ``io``: fresh leases,
        duration histogram and attempt counter."""
        leases = settings.leases
        forward = io.forwarder.forward if io.forwarder else None
        publish = io.publisher.send if io.publisher else None
        return cls(
            io.acker.ack,
            io.acker.modack,
            forward,
            relay=OutputRelay(publish, PublishRules.of(settings), backlog),
            policy=SettlePolicy.of(settings),
            leases=LeaseSchedule(leases.ack_deadline),
            backlog=backlog,
            durations=Histogram(leases.min_ack_deadline, leases.max_ack_deadline),
            attempts=AttemptCounter(),
            counters=counters,
            log=log,
            metrics=metrics,
        )

    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        """The tasks the fork server found, with their `@task(...)` options: the one copy of them."""
        self.task_options = dict(tasks)

    def options_of(self, task: str) -> TaskOptions:
        return self.task_options.get(task, NO_OPTIONS)

    def apply(self, settings: Settings) -> None:
        """A reload: the new retry, dead-letter and lease settings apply to attempts that end from now on."""
        self.policy = SettlePolicy.of(settings)
        self.durations.set_bounds(settings.leases.min_ack_deadline, settings.leases.max_ack_deadline)

    def attempt_of(self, message_id: str, delivery_attempt: int | None, now: float) -> int:
        """Which attempt this delivery is: Pub/Sub's count where it keeps one, else ours."""
        return self.attempts.count(message_id, delivery_attempt, now)

    def prune(self, now: float) -> None:
        self.attempts.prune(now)

    def next_renewal(self) -> float | None:
        return self.leases.next_due()

    def dead_lettering(self) -> int:
        return len(self.forwarding)

    def publishing(self) -> int:
        """Messages whose dead-letter copy, or whose task's outputs, are being published: they
        still hold leases."""
        return len(self.forwarding) + len(self.relay)

    def take_publishing(self) -> list[InFlight]:
        """At shutdown: the messages still being dead-lettered or waiting for their outputs, no
        longer tracked here."""
        taken = [*self.forwarding.values(), *self.relay.take_all()]
        self.forwarding.clear()
        return taken

    def retry_of(self, task: str) -> RetryPolicy:
        """The retry policy for ``task``: its own backoff bounds where `@task` set them."""
        options = self.task_options.get(task)
        if options is None or (options.min_backoff is None and options.max_backoff is None):
            return self.policy.retry
        low = options.min_backoff if options.min_backoff is not None else self.policy.retry.min_backoff
        high = options.max_backoff if options.max_backoff is not None else self.policy.retry.max_backoff
        return RetryPolicy(min(low, high), high)

    def max_attempts_of(self, task: str) -> int:
        options = self.task_options.get(task)
        return options.max_attempts if options and options.max_attempts is not None else self.policy.max_attempts

    def hold(self, inflight: InFlight, now: float, deadline: float) -> None:
        """A pulled message is ours until settled: its lease is renewed and its bytes counted."""
        self.counters.received += 1
        self.metrics.received(inflight.attempt)
        self.leases.add(inflight.ack_id, now, deadline)
        self.backlog.hold(inflight)

    def holds(self, inflight: InFlight) -> bool:
        return inflight.ack_id in self.leases

    # == an attempt ended ======================================================================
    def settle(
        self,
        inflight: InFlight,
        outcome: Outcome,
        now: float,
        duration: float = 0.0,
        error: str = "",
        retry_after: float | None = None,
    ) -> None:
        """The one place a message's fate is decided: ack on success only, otherwise give it back
        after a delay, or forward it to the dead-letter topic (and ack it once that succeeded)."""
        decision = delivery.decide(
            outcome,
            inflight.attempt,
            self.retry_of(inflight.task),
            dead_letter=self._forward is not None,
            max_attempts=self.max_attempts_of(inflight.task),
            retry_after=retry_after,
        )
        fields = dict(
            message_id=inflight.message.message_id,
            task=inflight.task,
            attempt=inflight.attempt,
            worker_pid=inflight.worker_pid,
            duration_ms=round(duration * 1000, 3),
            size=inflight.message.size,
            outcome=outcome.value,
        )
        self.metrics.outcome(inflight.task, outcome.value)
        if decision.action is Action.ACK:
            self.release(inflight)
            self._ack([inflight.ack_id])
            self.attempts.forget(inflight.message.message_id)
            self.counters.succeeded += 1
            self.log.info("message.done", **fields)
        elif decision.action is Action.DEAD_LETTER:
            self.forward(inflight, outcome, error, now)
            self.log.warning("message.rejected", **fields, error=error, action=decision.action.value)
        else:
            self.retry_later(inflight, decision.delay, now)
            self.counters.failed += 1
            log = self.log.error if outcome in delivery.POISON else self.log.warning
            log("message.failed", **fields, error=error, retry_in_s=decision.delay)

    def finished(self, inflight: InFlight, result: Result, now: float) -> None:
        """A worker reported how the task ended. A success with outputs is acked once they are published."""
        self.backlog.finished(inflight)
        self.durations.add(result.duration)
        self.metrics.ran(inflight.task, result.duration)
        if result.outcome is Outcome.SUCCESS and result.outputs:
            if refusal := self.relay.relay(inflight, result):
                self.settle(inflight, Outcome.ERROR, now, result.duration, refusal)
            return
        self.settle(inflight, result.outcome, now, result.duration, result.error, result.retry_after)

    def on_io(self, item: Forwarded | OutputsPublished, now: float) -> None:
        """A publisher thread's report: a dead-letter copy, or a task's outputs."""
        if isinstance(item, Forwarded):
            self.on_forwarded(item, now)
            return
        entry = self.relay.settled(item)
        if entry is None:
            return
        inflight, duration = entry.inflight, entry.result.duration
        fields = dict(message_id=inflight.message.message_id, task=inflight.task, published=item.published)
        if item.ok:
            self.metrics.outputs_published(inflight.task, item.published)
            self.log.info("outputs.published", **fields)
            self.settle(inflight, Outcome.SUCCESS, now, duration)
        else:
            self.metrics.outputs_failed(inflight.task)
            self.log.error("outputs.publish_failed", **fields, outputs=len(entry.result.outputs), error=item.detail)
            self.settle(inflight, Outcome.ERROR, now, duration, f"publishing its outputs failed: {item.detail}")

    def lost(self, lost: list[Lost], reason: str, now: float) -> None:
        """Messages that were running when their worker died or retired: they did not succeed.
        (Those queued behind them never started: the caller puts them back in line, `Intake.requeue`.)"""
        for item in lost:
            self.metrics.ran(item.inflight.task, item.ran_for)
            self.backlog.finished(item.inflight)
            error = reason if item.outcome is not Outcome.INTERRUPTED else f"its worker was stopped: {reason}"
            self.settle(item.inflight, item.outcome, now, item.ran_for, error)

    def retry_later(self, inflight: InFlight, delay: int, now: float) -> None:
        """Set the lease to ``delay``: Pub/Sub hands the message out again once it ends. With
        ordering, later messages of its key are given back with it so they stay behind it."""
        self.release(inflight)
        self._modack([inflight.ack_id], delay)
        for later in self.backlog.hold_key(inflight.key, now + delay):
            self.give_back(later, delay=delay)

    def forward(self, inflight: InFlight, outcome: Outcome, error: str, now: float) -> None:
        """Publish a copy to the dead-letter topic; the original stays leased until that succeeded."""
        assert self._forward is not None
        self.forwarding[inflight.ack_id] = inflight
        message = inflight.message
        ours = {
            "consumerd_error": error or outcome.value,
            "consumerd_outcome": outcome.value,
            "consumerd_task": inflight.task,
            "consumerd_original_message_id": message.message_id,
            "consumerd_subscription": message.subscription,
            "consumerd_attempt": str(inflight.attempt),
        }
        attributes = deadletter.copy_attributes(message.attributes, ours)
        if deadletter.copy_size(message.data, attributes) > deadletter.MAX_MESSAGE_BYTES:
            # The service would refuse it: no point in publishing. Held, never dropped.
            self.on_forwarded(Forwarded(inflight.ack_id, False, "the copy would exceed Pub/Sub's 10 MB limit", permanent=True), now)
            return
        self._forward(DeadLetter(inflight.ack_id, message.data, attributes))

    def on_forwarded(self, result: Forwarded, now: float) -> None:
        inflight = self.forwarding.pop(result.ack_id, None)
        if inflight is None:
            return
        fields = dict(message_id=inflight.message.message_id, task=inflight.task, attempt=inflight.attempt)
        if result.ok:
            self.release(inflight)
            self._ack([inflight.ack_id])
            self.attempts.forget(inflight.message.message_id)
            self.counters.dead_lettered += 1
            self.metrics.forwarded(inflight.task)
            self.log.warning("message.dead_lettered", **fields, dead_letter_message_id=result.detail, outcome="dead_lettered")
        else:
            delay = delivery.MAX_DELAY
            self.counters.dead_letter_failed += 1
            self.metrics.dead_letter_failed(inflight.task)
            self.log.error("message.dead_letter_failed", **fields, error=result.detail, permanent=result.permanent, retry_in_s=delay)
            self.retry_later(inflight, delay, now)

    # == messages that never ran ===============================================================
    def give_back(self, inflight: InFlight, delay: float = 0) -> None:
        """Nack a message that never started (draining, a held ordering key): no attempt used."""
        self.release(inflight)
        self._modack([inflight.ack_id], delivery.clamp_delay(delay))
        self.counters.nacked_unstarted += 1

    def lapsed(self, inflight: InFlight, now: float) -> bool:
        """Its lease ran out while it waited here: Pub/Sub may already have given it to another consumer."""
        expires_at = self.leases.expires_at(inflight.ack_id)
        return expires_at is not None and now >= expires_at

    def drop_lapsed(self, inflight: InFlight, now: float) -> None:
        """Forget a message whose lease lapsed before it started: no ack, no nack, not run."""
        expired_for = now - (self.leases.expires_at(inflight.ack_id) or now)
        self.release(inflight)
        self.counters.lease_lapsed += 1
        self.metrics.lapsed()
        self.log.warning(
            "lease.lapsed",
            message_id=inflight.message.message_id,
            task=inflight.task,
            attempt=inflight.attempt,
            expired_s_ago=round(expired_for, 3),
            detail="not run: Pub/Sub has redelivered it",
        )

    def abandon(self, inflight: InFlight, now: float) -> None:
        """The safety net: handling this message raised. Give it back with its retry delay, once."""
        self.forwarding.pop(inflight.ack_id, None)
        self.relay.drop(inflight.ack_id)
        if self.holds(inflight):
            self.retry_later(inflight, self.retry_of(inflight.task).delay(inflight.attempt), now)
            self.counters.failed += 1

    def release(self, inflight: InFlight) -> None:
        """The supervisor stops holding the message: no more lease renewals, its bytes freed."""
        if self.holds(inflight):
            self.leases.remove(inflight.ack_id)
            self.backlog.released(inflight)

    # == leases ================================================================================
    def renew_leases(self, now: float) -> int:
        due = self.leases.due(now)
        if due:
            self.leases.ack_deadline = self.lease_length()
            self._modack(due, self.leases.ack_deadline)
            self.leases.renewed(due, now)
            self.metrics.renewed(len(due))
        return len(due)

    def lease_length(self) -> int:
        """The configured ack deadline, or (adaptive) the 99th percentile of task durations."""
        if self.policy.adaptive and self.durations.samples >= ADAPTIVE_MIN_SAMPLES:
            return self.durations.percentile(99)
        return self.policy.ack_deadline

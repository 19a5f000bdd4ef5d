"""The supervisor: one loop that pulls, dispatches to workers, renews leases, acks, and drains.

States: STARTING -> RUNNING -> DRAINING -> STOPPING -> STOPPED. The loop never blocks on an RPC
(pulls and acks run on two threads) and never runs task code (workers do). Signal handlers only
record the signal; the loop dispatches it to a `handle_<name>` method.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import delivery
from .acker import Acker
from .backlog import Backlog, InFlight
from .backoff import Backoff
from .config import Settings, load_settings, reload_plan
from .errors import ConfigError, ConsumerdError, ExitCode, PubSubUnavailable
from .flow import Ewma, prefetch_allowance, pull_size
from .forwarder import DeadLetter, Forwarded, Forwarder
from .histogram import Histogram
from .inbox import Inbox, drain_fd
from .leases import LeaseSchedule
from .logsetup import configure_logging, get_logger
from .message import Message
from .pool import KILL_GRACE, ForkServerDied, Pool, PoolEvent, WorkerExited, WorkerResult, WorkerStarted
from .protocol import ForkServerSpec
from .puller import PullResult, Puller
from .pubsub import PubSub, Received, is_transient
from .systemd import Notifier

STARTUP_TIMEOUT = 60.0  # seconds to start the workers before giving up
QUICK_STOP_GRACE = 1.0  # SIGTERM -> SIGKILL grace for running tasks on a second stop signal
STATUS_INTERVAL = 2.0
MAX_SLEEP = 1.0
# Timeouts, kill escalation, lease renewals, watchdog and status are checked this often. Leases are
# renewed with 40 % of their deadline (>= 4 s) to spare, so a 0.1 s lateness costs nothing.
HOUSEKEEPING_INTERVAL = 0.1
FLUSH_TIMEOUT = 10.0  # seconds to wait for the last acks/nacks at exit
ATTEMPTS_REMEMBERED = 100_000  # local delivery counts kept when Pub/Sub does not count attempts
ADAPTIVE_MIN_SAMPLES = 10  # finished tasks before the lease length follows their durations


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclasses.dataclass
class Counters:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    nacked_unstarted: int = 0


class Supervisor:
    def __init__(
        self, settings: Settings, config_path: Path | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.config_path = config_path  # re-read on SIGHUP
        self.concurrency = settings.workers.concurrency  # SIGHUP, SIGTTIN and SIGTTOU change it
        self.clock = clock
        self.state = State.STARTING
        self.log = get_logger("consumerd")
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.counters = Counters()
        self.leases = LeaseSchedule(settings.leases.ack_deadline)
        self.durations = Histogram(settings.leases.min_ack_deadline, settings.leases.max_ack_deadline)
        self.retry_policy = delivery.RetryPolicy(settings.retry.min_backoff, settings.retry.max_backoff)
        self.backlog = Backlog()  # pulled, not yet started; replaced once the subscription is known
        self.jobs: dict[int, InFlight] = {}  # job seq -> message running in a worker
        self.forwarding: dict[str, InFlight] = {}  # ack id -> message being copied to the dead-letter topic
        self.inbox = Inbox()
        self.attempts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.task_names: frozenset[str] = frozenset()
        self.requested = 0  # messages asked of the pull in flight
        self.task_seconds = Ewma()  # how long tasks take: sizes the prefetch buffer
        self.subscription_deadline = 10
        self.drain_deadline: float | None = None
        self.stop_deadline: float | None = None
        self.exit_code = ExitCode.OK
        self._signals: collections.deque[int] = collections.deque()
        self._next_status = 0.0
        self._next_housekeeping = 0.0
        self.pool: Pool
        self.pubsub: PubSub
        self.puller: Puller
        self.acker: Acker
        self.forwarder: Forwarder | None = None

    # == the table of contents =================================================================
    def run(self) -> ExitCode:
        self.install_signal_handlers()
        self.start_pool()
        self.connect_pubsub()
        if self.await_workers():
            self.start_io_threads()
            self.notify_ready()
            while self.state is not State.STOPPED:
                self.tick()
        self.shutdown()
        return self.exit_code

    def tick(self) -> None:
        now = self.clock()
        self.handle_signals()
        self.collect_inbox(now)
        self.dispatch(now)
        if now >= self._next_housekeeping:
            self.housekeeping(now)
        self.refill(now)
        self.advance_shutdown(now)
        self.wait_for_events()

    def housekeeping(self, now: float) -> None:
        """The periodic checks, at most every HOUSEKEEPING_INTERVAL, not on every event."""
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self.enforce_task_timeouts(now)
        self.pool.escalate_kills(now)
        self.renew_leases(now)
        self.report(now)

    # == start-up ==============================================================================
    def install_signal_handlers(self) -> None:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda: drain_fd(wake_r))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)  # only record: the loop handles it (no I/O, no logging here)

    def start_pool(self) -> None:
        workers = self.settings.workers
        spec = ForkServerSpec(
            sys_path=tuple(sys.path),
            modules=tuple(self.settings.tasks.modules),
            log_format=self.settings.logging.format,
            log_level=self.settings.logging.level,
            max_tasks_per_child=workers.max_tasks_per_child,
        )
        self.pool = Pool(spec, workers.concurrency, forget=self._forget_fd)
        self.task_names = frozenset(self.pool.start())
        self.check_tasks()
        self.selector.register(self.pool.control_fd, selectors.EVENT_READ, self._on_control_readable)
        self.pool.spawn_missing()
        self.log.info("workers.starting", concurrency=workers.concurrency, tasks=sorted(self.task_names))

    def check_tasks(self) -> None:
        tasks = self.settings.tasks
        if not self.task_names:
            raise ConfigError(f"tasks.modules: no tasks registered by {list(tasks.modules)} or entry points")
        if tasks.default and tasks.default not in self.task_names:
            raise ConfigError(f"tasks.default: no task named {tasks.default!r} (known: {', '.join(sorted(self.task_names))})")

    def connect_pubsub(self) -> None:
        """Check the subscription exists; retry while Pub/Sub is unreachable, up to STARTUP_TIMEOUT."""
        self.pubsub = PubSub(self.settings.pubsub)
        give_up_at = self.clock() + self.settings.pubsub.startup_timeout
        backoff = Backoff(base=0.5, cap=5.0)
        attempt = 0
        while True:
            try:
                info = self.pubsub.describe_subscription()
                break
            except ConsumerdError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then reported as unavailable
                attempt += 1
                if not is_transient(exc) or self.clock() >= give_up_at:
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    raise PubSubUnavailable(
                        f"Pub/Sub unreachable for {self.pubsub.subscription} after {attempt} attempts "
                        f"(pubsub.startup_timeout): {type(exc).__name__}: {first_line}"[:500]
                    ) from None
                delay = backoff.delay(attempt)
                self.log.warning("pubsub.unreachable", error=type(exc).__name__, attempt=attempt, retry_in_s=round(delay, 2))
                if self.wait_or_stop(delay):
                    return
        self.subscription_deadline = info.ack_deadline
        self.backlog = Backlog(ordered=info.ordering, max_running_bytes=self.settings.flow.max_inflight_bytes)
        self.check_dead_letter_topic()
        self.log.info(
            "pubsub.subscribed",
            subscription=info.path,
            ack_deadline=info.ack_deadline,
            dead_letter=bool(info.dead_letter_topic),
            exactly_once=info.exactly_once,
            ordering=info.ordering,
        )

    def check_dead_letter_topic(self) -> None:
        topic = self.settings.dead_letter.topic
        if topic and not self.pubsub.topic_exists(self.settings.pubsub.topic_path(topic)):
            raise ConfigError(f"dead_letter.topic: {self.settings.pubsub.topic_path(topic)} does not exist")

    def await_workers(self) -> bool:
        """Run the loop until every worker started; False if a stop signal came first."""
        give_up_at = self.clock() + STARTUP_TIMEOUT
        while len(self.pool.idle_workers()) < self.concurrency:
            if self.stop_requested() or self.exit_code is not ExitCode.OK:
                return False
            if self.clock() >= give_up_at:
                raise ForkServerDied(f"workers did not start within {STARTUP_TIMEOUT:.0f}s")
            self.wait_for_events(MAX_SLEEP)
        return not self.stop_requested()

    def stop_requested(self) -> bool:
        return any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals)

    def wait_or_stop(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` while still noticing signals and worker events; True if asked to stop."""
        deadline = self.clock() + seconds
        while (remaining := deadline - self.clock()) > 0 and not self.stop_requested():
            self.wait_for_events(min(remaining, MAX_SLEEP))
            self.notifier.ping_watchdog(self.clock())
        return self.stop_requested()

    def start_io_threads(self) -> None:
        self.selector.register(self.inbox.fd, selectors.EVENT_READ, lambda: None)  # read in collect_inbox
        self.puller = Puller(self.pubsub.pull, self.inbox, is_transient)
        self.acker = Acker(self.pubsub.ack, self.pubsub.modack, is_transient)
        self.puller.start()
        self.acker.start()
        if self.settings.dead_letter.topic:
            topic = self.settings.pubsub.topic_path(self.settings.dead_letter.topic)
            self.forwarder = Forwarder(lambda data, attrs: self.pubsub.publish(topic, data, attrs), self.inbox, is_transient)
            self.forwarder.start()

    def notify_ready(self) -> None:
        self.state = State.RUNNING
        self.notifier.ready(self.status_text())
        self.log.info(
            "daemon.ready",
            subscription=self.pubsub.subscription,
            concurrency=self.concurrency,
            systemd=self.notifier.enabled,
            watchdog_s=self.notifier.watchdog_interval,
        )

    # == the loop ==============================================================================
    def wait_for_events(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = max(0.0, self.next_wakeup() - self.clock())
        for key, _ in self.selector.select(timeout):
            key.data()

    def next_wakeup(self) -> float:
        now = self.clock()
        # Something is due soon (a lease, a timeout, a kill, the watchdog): look again at the next
        # housekeeping time; otherwise sleep until an event or MAX_SLEEP.
        candidates = [
            self.leases.next_due(),
            self.pool.next_deadline(),
            self.notifier.watchdog_due(now),
            self.drain_deadline,
            self.stop_deadline,
            self.next_task_deadline(),
        ]
        due = min((c for c in candidates if c is not None), default=now + MAX_SLEEP)
        return min(max(due, self._next_housekeeping), now + MAX_SLEEP)

    def next_task_deadline(self) -> float | None:
        if not self.jobs:
            return None
        timeout = self.settings.workers.task_timeout
        return min(w.started_at for w in self.pool.workers.values() if w.job) + timeout

    def _on_control_readable(self) -> None:
        try:
            self.on_pool_events(self.pool.read_control())
        except ForkServerDied as exc:
            self.selector.unregister(self.pool.control_fd)
            self.fail(f"fork server died: {exc}")

    def _on_worker_readable(self, worker: Any) -> None:
        self.on_pool_events(self.pool.read_worker(worker, self.clock()))

    def _forget_fd(self, sock: Any) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def on_pool_events(self, events: list[PoolEvent]) -> None:
        now = self.clock()
        for event in events:
            if isinstance(event, WorkerStarted):
                worker = event.worker
                self.selector.register(worker.sock, selectors.EVENT_READ, lambda w=worker: self._on_worker_readable(w))
                self.log.debug("worker.started", worker_pid=worker.pid)
            elif isinstance(event, WorkerResult):
                inflight = self.jobs.pop(event.job.seq)
                self.backlog.finished(inflight)
                self.task_seconds.add(now - event.worker.started_at)
                self.durations.add(event.result.duration)
                result = event.result
                self.settle(inflight, result.outcome, now, result.duration, result.error, result.retry_after)
                self.pool.retire_surplus()
            elif isinstance(event, WorkerExited):
                self.on_worker_exited(event, now)

    def on_worker_exited(self, event: WorkerExited, now: float) -> None:
        crashed = event.job is not None or event.exit_code != 0
        log = self.log.warning if crashed else self.log.debug
        log("worker.exited", worker_pid=event.worker.pid, reason=event.reason, tasks_done=event.worker.tasks_done)
        if event.job is not None and event.job.seq in self.jobs:
            inflight = self.jobs.pop(event.job.seq)
            self.backlog.finished(inflight)
            outcome = delivery.TIMEOUT if event.reason.startswith("timeout") else delivery.CRASH
            if self.state is State.STOPPING and event.worker.kill_reason:
                outcome = delivery.INTERRUPTED  # we stopped it: not the task's failure
            self.settle(inflight, outcome, now, now - event.worker.started_at, event.reason)

    def handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}")()

    def handle_term(self) -> None:
        if self.state is State.RUNNING:
            self.begin_drain()
        elif self.state is State.DRAINING:
            self.log.warning("daemon.stop_now", reason="second stop signal", running=len(self.jobs))
            self.stop_running_tasks("stopped by a second signal", QUICK_STOP_GRACE)

    handle_int = handle_term

    def handle_hup(self) -> None:
        """Reload: re-read the config, apply what can change at run time, refuse the rest."""
        if self.state is not State.RUNNING or self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
            new.require_subscription(str(self.config_path))
        except ConfigError as exc:
            self.log.error("reload.rejected", error=str(exc), detail="still running with the previous config")
        else:
            merged, applied, refused = reload_plan(self.settings, new)
            for key in refused:
                self.log.warning("reload.refused", key=key, detail="cannot change while running: restart to apply")
            self.apply_settings(merged)
            self.log.info("reload.done", applied=applied, refused=refused, concurrency=self.concurrency)
        self.notifier.ready(self.status_text())

    def apply_settings(self, settings: Settings) -> None:
        """Run with ``settings`` from now on; running tasks keep going under their old timeout start."""
        self.settings = settings
        self.resize(settings.workers.concurrency)
        self.retry_policy = delivery.RetryPolicy(settings.retry.min_backoff, settings.retry.max_backoff)
        self.durations.minimum = settings.leases.min_ack_deadline
        self.durations.maximum = settings.leases.max_ack_deadline
        self.backlog.max_running_bytes = settings.flow.max_inflight_bytes
        configure_logging(settings.logging.format, settings.logging.level)

    def handle_ttin(self) -> None:
        self.resize(self.concurrency + 1)
        self.log.info("workers.resized", concurrency=self.concurrency, signal="SIGTTIN")

    def handle_ttou(self) -> None:
        self.resize(max(1, self.concurrency - 1))
        self.log.info("workers.resized", concurrency=self.concurrency, signal="SIGTTOU")

    def resize(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.pool.size = concurrency
        self.pool.retire_surplus()  # idle ones now; busy ones when they finish (on_pool_events)

    def collect_inbox(self, now: float) -> None:
        for item in self.inbox.take_all():
            if isinstance(item, PullResult):
                self.requested -= item.asked
                for received in item.received:
                    self.admit(received, now)
            elif isinstance(item, Forwarded):
                self.on_forwarded(item, now)

    def admit(self, received: Received, now: float) -> None:
        message = received.message
        if self.settings.tasks.idempotency_attribute:
            message = dataclasses.replace(message, key_attribute=self.settings.tasks.idempotency_attribute)
        self.counters.received += 1
        inflight = InFlight(received.ack_id, message, self.route(message), self.count_attempt(message), now)
        self.leases.add(received.ack_id, now, self.subscription_deadline)
        self.backlog.hold(inflight)
        max_bytes = self.settings.flow.max_message_bytes
        max_attempts = self.settings.dead_letter.max_attempts
        if self.state is not State.RUNNING:
            self.give_back(inflight)
        elif inflight.task not in self.task_names:
            self.settle(inflight, delivery.UNKNOWN_TASK, now, error=self.unknown_task_reason(message))
        elif max_bytes and inflight.size > max_bytes:
            self.settle(inflight, delivery.TOO_LARGE, now, error=f"{inflight.size} bytes > flow.max_message_bytes {max_bytes}")
        elif max_attempts and inflight.attempt > max_attempts:
            self.settle(inflight, delivery.REJECT, now, error=f"attempt {inflight.attempt} > dead_letter.max_attempts {max_attempts}")
        elif held_for := self.backlog.key_blocked_for(inflight.key, now):
            self.give_back(inflight, delay=held_for)  # its key waits for an earlier message's retry
        else:
            self.backlog.enqueue(inflight)

    def route(self, message: Message) -> str:
        return message.attributes.get(self.settings.tasks.route_attribute) or self.settings.tasks.default

    def unknown_task_reason(self, message: Message) -> str:
        attribute = self.settings.tasks.route_attribute
        if attribute not in message.attributes and not self.settings.tasks.default:
            return f"no {attribute!r} attribute and no tasks.default"
        return f"no task named {self.route(message)!r} (known: {', '.join(sorted(self.task_names))})"

    def count_attempt(self, message: Message) -> int:
        if message.delivery_attempt:
            return message.delivery_attempt
        count = self.attempts.pop(message.message_id, 0) + 1
        self.attempts[message.message_id] = count
        if len(self.attempts) > ATTEMPTS_REMEMBERED:
            self.attempts.popitem(last=False)
        return count

    def dispatch(self, now: float) -> None:
        if self.state is not State.RUNNING or not self.backlog:
            return
        idle = self.pool.idle_workers()
        while idle and (inflight := self.backlog.next_ready(now)) is not None:
            worker = idle.pop()
            job = self.pool.assign(worker, inflight.task, inflight.message, now)
            inflight.worker_pid = worker.pid
            self.jobs[job.seq] = inflight

    def enforce_task_timeouts(self, now: float) -> None:
        timeout = self.settings.workers.task_timeout
        for worker in list(self.pool.workers.values()):
            if worker.job is not None and worker.kill_escalate_at is None and now - worker.started_at >= timeout:
                self.pool.kill(worker, f"timeout after {timeout:g}s", now)

    def renew_leases(self, now: float) -> None:
        due = self.leases.due(now)
        if due:
            self.leases.ack_deadline = self.lease_length()
            self.acker.modack(due, self.leases.ack_deadline)
            self.leases.renewed(due, now)

    def lease_length(self) -> int:
        """The configured ack deadline, or (adaptive) the 99th percentile of task durations."""
        leases = self.settings.leases
        if leases.adaptive and self.durations.samples >= ADAPTIVE_MIN_SAMPLES:
            return self.durations.percentile(99)
        return leases.ack_deadline

    def refill(self, now: float) -> None:
        if self.state is not State.RUNNING:
            return
        self.pool.spawn_missing()
        if self.requested:
            return  # one pull at a time; the next is sized when this one's result is in
        budget = self.settings.flow.max_inflight_bytes
        if budget and self.backlog.held_bytes >= budget:
            return  # the byte budget is spent: pull again when messages are done
        prefetch = prefetch_allowance(self.concurrency, self.task_seconds.value)
        n = pull_size(self.concurrency, len(self.jobs), len(self.backlog), self.requested, prefetch=prefetch)
        if n:
            self.requested = n
            self.puller.request(n)

    def report(self, now: float) -> None:
        self.notifier.ping_watchdog(now)
        if now >= self._next_status:
            self.notifier.status(self.status_text())
            self._next_status = now + STATUS_INTERVAL

    def status_text(self) -> str:
        c = self.counters
        return (
            f"{self.state.value}: {len(self.jobs)} running, {len(self.backlog)} queued, "
            f"{c.succeeded} succeeded, {c.failed} failed, {len(self.pool.workers)} workers"
        )

    # == results ===============================================================================
    def settle(
        self,
        inflight: InFlight,
        outcome: str,
        now: float,
        duration: float = 0.0,
        error: str = "",
        retry_after: float | None = None,
    ) -> None:
        """The one place a message's fate is decided: ack on success only, otherwise give it back
        after a delay, or forward it to the dead-letter topic (and ack it once that succeeded)."""
        dead_letter = self.settings.dead_letter
        decision = delivery.decide(
            outcome,
            inflight.attempt,
            self.retry_policy,
            dead_letter=bool(self.forwarder),
            max_attempts=dead_letter.max_attempts,
            retry_after=retry_after,
        )
        fields = dict(
            message_id=inflight.message.message_id,
            task=inflight.task,
            attempt=inflight.attempt,
            worker_pid=inflight.worker_pid,
            duration_ms=round(duration * 1000, 3),
            size=inflight.size,
            outcome=outcome,
        )
        if decision.action == "ack":
            self.release(inflight)
            self.acker.ack([inflight.ack_id])
            self.attempts.pop(inflight.message.message_id, None)
            self.counters.succeeded += 1
            self.log.info("message.done", **fields)
        elif decision.action == "dead_letter":
            self.forward(inflight, outcome, error)
            self.log.warning("message.rejected", **fields, error=error, action="dead_letter")
        else:
            self.retry_later(inflight, decision.delay, now)
            self.counters.failed += 1
            log = self.log.error if outcome in delivery.POISON else self.log.warning
            log("message.failed", **fields, error=error, retry_in_s=decision.delay)

    def retry_later(self, inflight: InFlight, delay: int, now: float) -> None:
        """Set the lease to ``delay``: Pub/Sub hands the message out again once it ends. With
        ordering, later messages of its key are given back with it so they stay behind it."""
        self.release(inflight)
        self.acker.modack([inflight.ack_id], delay)
        for later in self.backlog.hold_key(inflight.key, now + delay):
            self.give_back(later, delay=delay)

    def forward(self, inflight: InFlight, outcome: str, error: str) -> None:
        """Publish a copy to the dead-letter topic; the original stays leased until that succeeded."""
        assert self.forwarder is not None
        self.forwarding[inflight.ack_id] = inflight
        message = inflight.message
        attributes = {
            **message.attributes,
            "consumerd_error": (error or outcome)[:1024],
            "consumerd_outcome": outcome,
            "consumerd_task": inflight.task,
            "consumerd_original_message_id": message.message_id,
            "consumerd_subscription": message.subscription,
            "consumerd_attempt": str(inflight.attempt),
        }
        self.forwarder.forward(DeadLetter(inflight.ack_id, message.data, attributes))

    def on_forwarded(self, result: Forwarded, now: float) -> None:
        inflight = self.forwarding.pop(result.ack_id, None)
        if inflight is None:
            return
        fields = dict(message_id=inflight.message.message_id, task=inflight.task, attempt=inflight.attempt)
        if result.ok:
            self.release(inflight)
            self.acker.ack([inflight.ack_id])
            self.counters.dead_lettered += 1
            self.log.warning("message.dead_lettered", **fields, dead_letter_message_id=result.detail, outcome="dead_lettered")
        else:
            delay = delivery.MAX_DELAY
            self.log.error("message.dead_letter_failed", **fields, error=result.detail, retry_in_s=delay)
            self.retry_later(inflight, delay, now)

    def release(self, inflight: InFlight) -> None:
        """The supervisor stops holding the message: no more lease renewals, its bytes freed."""
        self.leases.remove(inflight.ack_id)
        self.backlog.released(inflight)

    def give_back(self, inflight: InFlight, delay: float = 0) -> None:
        """Nack a message that never started (draining, a held ordering key): no attempt used up."""
        self.release(inflight)
        self.acker.modack([inflight.ack_id], int(delay))
        self.counters.nacked_unstarted += 1

    # == stopping ==============================================================================
    def begin_drain(self) -> None:
        now = self.clock()
        self.state = State.DRAINING
        self.puller.stop()
        unstarted = self.backlog.take_all()
        for inflight in unstarted:
            self.give_back(inflight)
        drain = self.settings.shutdown.drain_timeout
        self.drain_deadline = now + drain
        self.notifier.stopping(self.status_text())
        self.notifier.extend_timeout(drain + KILL_GRACE + FLUSH_TIMEOUT)
        self.log.info("drain.started", running=len(self.jobs), given_back=len(unstarted), drain_timeout=drain)

    def stop_running_tasks(self, reason: str, grace: float) -> None:
        now = self.clock()
        self.state = State.STOPPING
        self.drain_deadline = None
        self.stop_deadline = now + grace + 5.0  # exit even if an exit status never arrives
        for worker in list(self.pool.workers.values()):
            if worker.job is not None:
                self.pool.kill(worker, reason, now, grace=grace)

    def advance_shutdown(self, now: float) -> None:
        if self.state is State.DRAINING and not self.jobs and not self.forwarding:
            self.state = State.STOPPED
        elif self.state is State.DRAINING and self.drain_deadline is not None and now >= self.drain_deadline:
            self.log.warning("drain.timeout", running=len(self.jobs))
            self.stop_running_tasks("drain timeout", KILL_GRACE)
        elif self.state is State.STOPPING and (not self.jobs or now >= (self.stop_deadline or now)):
            self.state = State.STOPPED

    def fail(self, reason: str) -> None:
        """A fatal error in the loop: stop quickly, give every message back, exit non-zero."""
        self.log.error("daemon.fatal", error=reason)
        self.exit_code = ExitCode.SOFTWARE
        if self.state in (State.RUNNING, State.STARTING) and hasattr(self, "acker"):
            for inflight in self.backlog.take_all():
                self.give_back(inflight)
        self.stop_running_tasks(reason, QUICK_STOP_GRACE)

    def shutdown(self) -> None:
        """Give back what is left, flush acks, close channels and workers. Safe after a partial start."""
        now = self.clock()
        if hasattr(self, "acker"):
            for inflight in self.jobs.values():
                self.settle(inflight, delivery.SHUTDOWN, now, error="daemon stopped before the task ended")
            for inflight in [*self.backlog.take_all(), *self.forwarding.values()]:
                self.give_back(inflight)
            self.jobs.clear()
            self.forwarding.clear()
            self.puller.stop()
            if self.forwarder:
                self.forwarder.stop()
            if not self.acker.flush(FLUSH_TIMEOUT):
                self.log.error("pubsub.flush_timeout", detail="some acks/nacks were not sent; those messages will be redelivered")
            self.acker.stop()
        if hasattr(self, "pubsub"):
            self.pubsub.close()
        if hasattr(self, "pool"):
            self.pool.stop()
        self.state = State.STOPPED
        self.notifier.status("stopped")
        rpcs = self.pubsub.rpcs.counts if hasattr(self, "pubsub") else {}
        self.log.info(
            "daemon.stopped",
            **dataclasses.asdict(self.counters),
            rpcs=rpcs,
            notify_dropped=self.notifier.dropped,
            exit_code=int(self.exit_code),
        )

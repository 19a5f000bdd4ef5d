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
from typing import Any

from .acker import Acker
from .backoff import Backoff
from .config import Settings
from .errors import ConfigError, ConsumerdError, ExitCode, PubSubUnavailable
from .flow import Ewma, prefetch_allowance, pull_size
from .leases import LeaseSchedule
from .logsetup import get_logger
from .message import Message
from .pool import KILL_GRACE, ForkServerDied, Pool, PoolEvent, WorkerExited, WorkerResult, WorkerStarted
from .protocol import ForkServerSpec
from .puller import Puller
from .pubsub import PubSub, Received, is_transient
from .systemd import Notifier

STARTUP_TIMEOUT = 60.0  # seconds to reach Pub/Sub and start the workers before giving up
QUICK_STOP_GRACE = 1.0  # SIGTERM -> SIGKILL grace for running tasks on a second stop signal
STATUS_INTERVAL = 2.0
MAX_SLEEP = 1.0
# Timeouts, kill escalation, lease renewals, watchdog and status are checked this often. Leases are
# renewed with 40 % of their deadline (>= 4 s) to spare, so a 0.1 s lateness costs nothing.
HOUSEKEEPING_INTERVAL = 0.1
FLUSH_TIMEOUT = 10.0  # seconds to wait for the last acks/nacks at exit
RETRY_BACKOFF = Backoff(base=1.0, cap=60.0)  # seconds before a failed message comes back
ATTEMPTS_REMEMBERED = 100_000
INTERRUPTED = frozenset({"interrupted", "shutdown"})  # outcomes that are the daemon's doing  # local delivery counts kept when Pub/Sub does not count attempts


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclasses.dataclass(slots=True)
class InFlight:
    """A pulled message the supervisor holds a lease on, until it is acked or nacked."""

    ack_id: str
    message: Message
    task: str
    attempt: int
    received_at: float
    worker_pid: int | None = None


@dataclasses.dataclass
class Counters:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    nacked_unstarted: int = 0


class Supervisor:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.state = State.STARTING
        self.log = get_logger("consumerd")
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.counters = Counters()
        self.leases = LeaseSchedule(settings.leases.ack_deadline)
        self.buffer: collections.deque[InFlight] = collections.deque()  # pulled, not yet started
        self.jobs: dict[int, InFlight] = {}  # job seq -> message running in a worker
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
        self.wait_for_events()
        now = self.clock()
        self.handle_signals()
        self.collect_pulls(now)
        self.dispatch(now)
        if now >= self._next_housekeeping:
            self.housekeeping(now)
        self.refill(now)
        self.advance_shutdown(now)

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
        self.selector.register(wake_r, selectors.EVENT_READ, lambda: _drain_pipe(wake_r))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        give_up_at = self.clock() + STARTUP_TIMEOUT
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
                    raise PubSubUnavailable(
                        f"Pub/Sub unreachable for {self.pubsub.subscription}: {type(exc).__name__}: {exc}"
                    ) from None
                delay = backoff.delay(attempt)
                self.log.warning("pubsub.unreachable", error=type(exc).__name__, attempt=attempt, retry_in_s=round(delay, 2))
                if self.wait_or_stop(delay):
                    return
        self.subscription_deadline = info.ack_deadline
        self.log.info(
            "pubsub.subscribed",
            subscription=info.path,
            ack_deadline=info.ack_deadline,
            dead_letter=bool(info.dead_letter_topic),
            exactly_once=info.exactly_once,
            ordering=info.ordering,
        )

    def await_workers(self) -> bool:
        """Run the loop until every worker started; False if a stop signal came first."""
        give_up_at = self.clock() + STARTUP_TIMEOUT
        while len(self.pool.idle_workers()) < self.settings.workers.concurrency:
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
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda: _drain_pipe(wake_r))
        self.puller = Puller(self.pubsub.pull, wake_w, is_transient)
        self.acker = Acker(self.pubsub.ack, self.pubsub.modack, is_transient)
        self.puller.start()
        self.acker.start()

    def notify_ready(self) -> None:
        self.state = State.RUNNING
        self.notifier.ready(self.status_text())
        self.log.info(
            "daemon.ready",
            subscription=self.pubsub.subscription,
            concurrency=self.settings.workers.concurrency,
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
                self.task_seconds.add(now - event.worker.started_at)
                outcome = "success" if event.result.ok else "error"
                self.settle(inflight, outcome, now, duration=event.result.duration, error=event.result.error)
            elif isinstance(event, WorkerExited):
                self.on_worker_exited(event, now)

    def on_worker_exited(self, event: WorkerExited, now: float) -> None:
        crashed = event.job is not None or event.exit_code != 0
        log = self.log.warning if crashed else self.log.debug
        log("worker.exited", worker_pid=event.worker.pid, reason=event.reason, tasks_done=event.worker.tasks_done)
        if event.job is not None and event.job.seq in self.jobs:
            inflight = self.jobs.pop(event.job.seq)
            outcome = "timeout" if event.reason.startswith("timeout") else "crash"
            if self.state is State.STOPPING and event.worker.kill_reason:
                outcome = "interrupted"  # we stopped it: not the task's failure
            self.settle(inflight, outcome, now, duration=now - event.worker.started_at, error=event.reason)

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
        self.log.warning("daemon.reload_unsupported", detail="SIGHUP ignored: restart to apply a new config")

    def collect_pulls(self, now: float) -> None:
        while not self.puller.results.empty():
            result = self.puller.results.get_nowait()
            self.requested -= result.asked
            for received in result.received:
                self.admit(received, now)

    def admit(self, received: Received, now: float) -> None:
        message = received.message
        self.counters.received += 1
        inflight = InFlight(received.ack_id, message, self.route(message), self.count_attempt(message), now)
        self.leases.add(received.ack_id, now, self.subscription_deadline)
        if self.state is not State.RUNNING:
            self.give_back(inflight)
        elif inflight.task not in self.task_names:
            self.settle(inflight, "unknown_task", now, error=self.unknown_task_reason(message))
        else:
            self.buffer.append(inflight)

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
        idle = self.pool.idle_workers()
        while self.buffer and idle and self.state is State.RUNNING:
            inflight = self.buffer.popleft()
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
            self.acker.modack(due, self.settings.leases.ack_deadline)
            self.leases.renewed(due, now)

    def refill(self, now: float) -> None:
        if self.state is not State.RUNNING:
            return
        self.pool.spawn_missing()
        if self.requested:
            return  # one pull at a time; the next is sized when this one's result is in
        concurrency = self.settings.workers.concurrency
        prefetch = prefetch_allowance(concurrency, self.task_seconds.value)
        n = pull_size(concurrency, len(self.jobs), len(self.buffer), self.requested, prefetch=prefetch)
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
            f"{self.state.value}: {len(self.jobs)} running, {len(self.buffer)} queued, "
            f"{c.succeeded} succeeded, {c.failed} failed, {len(self.pool.workers)} workers"
        )

    # == results ===============================================================================
    def settle(self, inflight: InFlight, outcome: str, now: float, duration: float = 0.0, error: str = "") -> None:
        """The one place a message's fate is decided: ack on success only, otherwise give it back."""
        self.leases.remove(inflight.ack_id)
        fields = dict(
            message_id=inflight.message.message_id,
            task=inflight.task,
            attempt=inflight.attempt,
            worker_pid=inflight.worker_pid,
            duration_ms=round(duration * 1000, 3),
            size=inflight.message.size,
            outcome=outcome,
        )
        if outcome == "success":
            self.acker.ack([inflight.ack_id])
            self.attempts.pop(inflight.message.message_id, None)
            self.counters.succeeded += 1
            self.log.info("message.done", **fields)
            return
        # A failed message comes back after a short, growing delay rather than at once, so a failing
        # task cannot spin through redeliveries: its lease is set to the delay. One we interrupted
        # ourselves (stopping) comes back at once, for another consumer to take.
        delay = 0 if outcome in INTERRUPTED else round(RETRY_BACKOFF.delay(inflight.attempt))
        self.acker.modack([inflight.ack_id], delay)
        self.counters.failed += 1
        log = self.log.error if outcome == "unknown_task" else self.log.warning
        log("message.failed", **fields, error=error)

    def give_back(self, inflight: InFlight) -> None:
        """Nack a message that never started (draining, stopping): no attempt was used up."""
        self.leases.remove(inflight.ack_id)
        self.acker.modack([inflight.ack_id], 0)
        self.counters.nacked_unstarted += 1

    # == stopping ==============================================================================
    def begin_drain(self) -> None:
        now = self.clock()
        self.state = State.DRAINING
        self.puller.stop()
        for inflight in self.buffer:
            self.give_back(inflight)
        unstarted = len(self.buffer)
        self.buffer.clear()
        drain = self.settings.shutdown.drain_timeout
        self.drain_deadline = now + drain
        self.notifier.stopping(self.status_text())
        self.notifier.extend_timeout(drain + KILL_GRACE + FLUSH_TIMEOUT)
        self.log.info("drain.started", running=len(self.jobs), given_back=unstarted, drain_timeout=drain)

    def stop_running_tasks(self, reason: str, grace: float) -> None:
        now = self.clock()
        self.state = State.STOPPING
        self.drain_deadline = None
        self.stop_deadline = now + grace + 5.0  # exit even if an exit status never arrives
        for worker in list(self.pool.workers.values()):
            if worker.job is not None:
                self.pool.kill(worker, reason, now, grace=grace)

    def advance_shutdown(self, now: float) -> None:
        if self.state is State.DRAINING and not self.jobs:
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
        if self.state in (State.RUNNING, State.STARTING):
            for inflight in self.buffer:
                self.give_back(inflight)
            self.buffer.clear()
        self.stop_running_tasks(reason, QUICK_STOP_GRACE)

    def shutdown(self) -> None:
        """Give back what is left, flush acks, close channels and workers. Safe after a partial start."""
        now = self.clock()
        for inflight in self.jobs.values():
            self.settle(inflight, "shutdown", now, error="daemon stopped before the task ended")
        for inflight in self.buffer:
            self.give_back(inflight)
        self.buffer.clear()
        self.jobs.clear()
        if hasattr(self, "acker"):
            self.puller.stop()
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
        self.log.info("daemon.stopped", **dataclasses.asdict(self.counters), rpcs=rpcs, exit_code=int(self.exit_code))


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

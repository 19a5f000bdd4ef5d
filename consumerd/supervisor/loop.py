"""The supervisor: one loop that pulls, dispatches to workers, renews leases, acks, and drains.

States: STARTING -> RUNNING -> DRAINING -> STOPPING -> STOPPED. The loop never blocks on an RPC
(pulls and acks run on threads) and never runs task code (workers do). Signal handlers only record
the signal; the loop dispatches it to a `handle_<name>` method. What becomes of a message is the
`Settler`'s business, what may start is `admission.triage`'s, what a worker does is the `Pool`'s.
An exception while handling one event fails that event's message, not the daemon (`SafetyNet`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import selectors
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumerd import __version__
from consumerd.adapters.proctitle import set_title
from consumerd.adapters.prometheus import Metrics, NullMetrics
from consumerd.adapters.pubsub.client import connect
from consumerd.adapters.pubsub.forwarder import Forwarded
from consumerd.adapters.pubsub.puller import PullResult
from consumerd.adapters.systemd import Notifier
from consumerd.config import Settings
from consumerd.control.commands import Steering
from consumerd.errors import ExitCode
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.records import Outcome
from consumerd.logsetup import get_logger
from consumerd.policy.backlog import Backlog
from consumerd.pool.handles import EXIT_CAUSES, KillReason, PoolEvent, WorkerExited, WorkerResult, WorkerStarted
from consumerd.pool.pool import ForkServerDied, fork_server_spec
from consumerd.supervisor.components import Components
from consumerd.supervisor.descriptors import check_concurrency, max_concurrency, raise_nofile
from consumerd.supervisor.intake import STALL, Intake
from consumerd.supervisor.reload import Reloader
from consumerd.supervisor.reporter import Reporter
from consumerd.supervisor.safety import SafetyNet
from consumerd.supervisor.settler import Counters, Settler
from consumerd.supervisor.signals import SignalQueue

STARTUP_TIMEOUT = 60.0  # seconds to start the workers before giving up
QUICK_STOP_GRACE = 1.0  # SIGTERM -> SIGKILL grace for running tasks on a second stop signal
MAX_SLEEP = 1.0
# Timeouts, kill escalation, lease renewals, watchdog and status are checked this often. Leases are
# renewed with 40 % of their deadline (>= 4 s) to spare, so a 0.1 s lateness costs nothing.
HOUSEKEEPING_INTERVAL = 0.1


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        components: Components | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.components = components or Components()
        self.concurrency = settings.workers.concurrency  # SIGHUP, SIGTTIN and SIGTTOU change it
        self.max_concurrency = settings.workers.concurrency  # raised once the descriptor limit is known
        self.state = State.STARTING
        self.exit_code = ExitCode.OK
        self.log = get_logger("consumerd")
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.signals = SignalQueue()
        self.reloader = Reloader(config_path)
        self.resources = contextlib.ExitStack()  # what start-up started, stopped in reverse by shutdown
        self.backlog = Backlog(max_running_bytes=settings.flow.max_inflight_bytes)
        self.counters = Counters()
        self.inbox = Inbox()
        self.pubsub = self.components.pubsub(settings)
        self.io = self.components.io_threads(self.pubsub, settings, self.inbox)
        forward = self.io.forwarder.forward if self.io.forwarder else None
        self.metrics = Metrics(__version__, self.pubsub.rpcs.snapshot, EXIT_CAUSES) if settings.metrics.listen else NullMetrics()
        self.settler = Settler.of(
            settings, self.io.acker.ack, self.io.acker.modack, forward, self.backlog, self.counters, self.log, self.metrics
        )
        self.pool = self.components.pool(fork_server_spec(settings), settings.workers.concurrency, self.forget_fd)
        self.safety = SafetyNet(self.settler, self.counters, self.log, clock, self.on_errors_exhausted)
        self.intake = Intake(settings, self.settler, self.backlog, self.safety.caught)
        self.reporter = Reporter(self.notifier, self.metrics, self.pool, self.backlog, self.settler, self.io.puller)
        self.paused = False  # `consumerd pause`: no pulls; what is here runs on
        self.steering = Steering(self, self.selector, clock, self.forget_fd, self.log)
        self.drain_deadline: float | None = None
        self.stop_deadline: float | None = None
        self._next_housekeeping = 0.0

    # == the table of contents =================================================================
    def run(self) -> ExitCode:
        try:
            set_title(f"supervisor [{self.settings.pubsub.subscription}]")
            self.signals.install(self.selector)
            self.start_observability()
            self.start_pool()
            self.connect_pubsub()
            if self.await_workers():
                self.start_io_threads()
                self.notify_ready()
                while self.state is not State.STOPPED:
                    with self.safety.guard("loop"):
                        self.tick()
        finally:
            self.shutdown()
        return self.exit_code

    def tick(self) -> None:
        now = self.clock()
        self.intake.ticked(now)
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
        if now - self._next_housekeeping > STALL:  # the loop was frozen (SIGSTOP, a VM pause)
            self.intake.drop_lapsed(now)  # before renewing: a renewal would make a lapsed lease look alive
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self.pool.kill_overdue(now)
        self.pool.escalate_kills(now)
        self.settler.renew_leases(now)
        self.intake.prune(now)
        self.reporter.housekeeping(now, self.state.value, self.concurrency)
        self.steering.drop_stale(now)

    # == start-up ==============================================================================
    def start_observability(self) -> None:
        """Metrics, probes and the control socket first: they answer while the rest starts."""
        self.reporter.serve(self.settings.metrics.listen, self.resources, self.log)
        self.steering.listen(self.settings.control.socket_path(), self.settings.control.group, self.resources)

    def start_pool(self) -> None:
        nofile = raise_nofile()
        check_concurrency(self.concurrency, nofile)
        self.max_concurrency = min(max_concurrency(nofile), 1024)
        self.resources.callback(self.pool.stop)
        self.intake.set_tasks(self.pool.start())
        self.settings.check_task_names(self.intake.task_names)
        self.metrics.known_tasks(self.intake.task_names)
        self.selector.register(self.pool.control_fd, selectors.EVENT_READ, self._on_control_readable)
        self.pool.spawn_missing()
        self.log.info("workers.starting", concurrency=self.concurrency, tasks=sorted(self.intake.task_names), nofile=nofile)

    def connect_pubsub(self) -> None:
        """Check the subscription exists; retry while Pub/Sub is unreachable, up to startup_timeout."""
        self.resources.callback(self.pubsub.close)
        info = connect(self.pubsub, self.settings, self.clock, self.wait_or_stop, self.log)
        if info is None:
            return  # asked to stop while waiting
        self.intake.subscribed(info.ack_deadline)
        self.backlog.configure(ordered=info.ordering)

    def await_workers(self) -> bool:
        """Run the loop until every worker started; False if a stop signal came first."""
        give_up_at = self.clock() + STARTUP_TIMEOUT
        while len(self.pool.idle_workers()) < self.concurrency:
            if self.signals.stop_requested() or self.exit_code is not ExitCode.OK:
                return False
            if self.clock() >= give_up_at:
                raise ForkServerDied(f"workers did not start within {STARTUP_TIMEOUT:.0f}s")
            self.wait_for_events(MAX_SLEEP)
        return not self.signals.stop_requested()

    def wait_or_stop(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` while still noticing signals and worker events; True if asked to stop."""
        deadline = self.clock() + seconds
        while (remaining := deadline - self.clock()) > 0 and not self.signals.stop_requested():
            self.wait_for_events(min(remaining, MAX_SLEEP))
            self.notifier.ping_watchdog(self.clock())
        return self.signals.stop_requested()

    def start_io_threads(self) -> None:
        self.selector.register(self.inbox.fd, selectors.EVENT_READ, lambda: None)  # read in collect_inbox
        self.io.start(self.resources, lambda: self.settings.shutdown.flush_timeout, self.log)

    def notify_ready(self) -> None:
        self.state = State.RUNNING
        self.intake.ticked(self.clock())
        self.reporter.announce_ready(self.clock(), self.paused, self.pubsub.subscription, self.concurrency, self.log)

    # == the loop ==============================================================================
    def wait_for_events(self, timeout: float | None = None) -> None:
        self.reporter.tick(self.clock(), self.state.value, self.paused)
        if timeout is None:
            timeout = max(0.0, self.next_wakeup() - self.clock())
        for key, _ in self.selector.select(timeout):
            with self.safety.guard("event"):
                key.data()

    def next_wakeup(self) -> float:
        now = self.clock()
        # Something is due soon (a lease, a timeout, a kill, the watchdog): look again at the next
        # housekeeping time; otherwise sleep until an event or MAX_SLEEP.
        candidates = [self.settler.next_renewal(), self.pool.next_deadline(), self.intake.next_batch_due()]
        candidates += [self.notifier.watchdog_due(now), self.drain_deadline, self.stop_deadline]
        due = min((c for c in candidates if c is not None), default=now + MAX_SLEEP)
        return min(max(due, self._next_housekeeping), now + MAX_SLEEP)

    def _on_control_readable(self) -> None:
        try:
            self.on_pool_events(self.pool.read_control(self.clock()))
        except ForkServerDied as exc:
            self.forget_fd(self.pool.control_fd)
            self.fail(f"fork server died: {exc}")

    def _on_worker_readable(self, worker: Any) -> None:
        self.on_pool_events(self.pool.read_worker(worker, self.clock()))

    def forget_fd(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def on_pool_events(self, events: list[PoolEvent]) -> None:
        now = self.clock()
        for event in events:
            if isinstance(event, WorkerStarted):
                worker = event.worker
                self.selector.register(worker.sock, selectors.EVENT_READ, lambda w=worker: self._on_worker_readable(w))
                self.log.debug("worker.started", worker_pid=worker.pid)
            elif isinstance(event, WorkerResult):
                with self.safety.guard("worker.result", event.inflight):
                    self.on_result(event, now)
            elif isinstance(event, WorkerExited):
                with self.safety.guard("worker.exited", event.held):
                    self.intake.requeue(event.unstarted, self.state is State.RUNNING)
                    self.settler.worker_exited(event, now)
                    if event.start_hook_failed:
                        self.fail("a worker's on_worker_start hook failed (worker.start_hook_failed)", ExitCode.CONFIG)

    def on_result(self, event: WorkerResult, now: float) -> None:
        self.intake.task_ran(event.ran_for)
        self.settler.finished(event.inflight, event.result, now)
        self.pool.retire_surplus()

    def on_errors_exhausted(self, reason: str) -> None:
        if self.exit_code is ExitCode.OK:
            self.fail(reason)
        else:
            self.state = State.STOPPED  # errors even while failing: stop the loop, shutdown still runs

    # == signals ===============================================================================
    def handle_signals(self) -> None:
        for name in self.signals.pop_all():
            getattr(self, f"handle_{name}")()

    def handle_term(self) -> None:
        if self.state is State.RUNNING:
            self.begin_drain()
        elif self.state is State.DRAINING:
            self.log.warning("daemon.stop_now", reason="second stop signal", running=self.pool.busy_count())
            self.stop_running_tasks(KillReason.SECOND_SIGNAL, QUICK_STOP_GRACE)

    handle_int = handle_term

    def handle_hup(self) -> None:
        """Reload: re-read the config, apply what can change at run time, refuse the rest."""
        if self.state is not State.RUNNING or not self.reloader.enabled:
            return
        self.notifier.reloading()
        merged = self.reloader.reload(self.settings, self.max_concurrency, self.log)
        if merged is not None:
            self.apply_settings(merged)
        self.notifier.ready(self.reporter.status_text(self.state.value))

    def apply_settings(self, settings: Settings) -> None:
        """Run with ``settings`` from now on; running tasks keep the timeout they started with."""
        self.settings = settings
        self.intake.apply(settings)
        self.settler.apply(settings)
        self.backlog.configure(max_running_bytes=settings.flow.max_inflight_bytes)
        self.resize(settings.workers.concurrency)

    def handle_ttin(self) -> None:
        if self.concurrency >= self.max_concurrency:
            self.log.warning("workers.resize_refused", concurrency=self.concurrency, maximum=self.max_concurrency, signal="SIGTTIN")
            return
        self.resize(self.concurrency + 1)
        self.log.info("workers.resized", concurrency=self.concurrency, signal="SIGTTIN")

    def handle_ttou(self) -> None:
        self.resize(max(1, self.concurrency - 1))
        self.log.info("workers.resized", concurrency=self.concurrency, signal="SIGTTOU")

    # == what the control socket may ask (control.commands.Steerable) ===========================
    def status(self) -> dict[str, Any]:
        return self.reporter.status(self.clock(), self.state.value, self.concurrency, self.paused)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.log.info("daemon.paused" if paused else "daemon.resumed", running=self.pool.busy_count(), queued=len(self.backlog))

    def drain(self) -> None:
        self.signals.record(signal.SIGTERM)  # exactly what SIGTERM does, on the next tick

    def resize(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.pool.resize(concurrency)

    # == messages in ===========================================================================
    def collect_inbox(self, now: float) -> None:
        for item in self.inbox.take_all():
            if isinstance(item, PullResult):
                running = self.state is State.RUNNING and not self.paused
                self.intake.pulled(item.asked, item.received, now, running, item.sent_at)
            elif isinstance(item, Forwarded):
                self.settler.on_forwarded(item, now)

    def dispatch(self, now: float) -> None:
        if self.state is State.RUNNING and self.backlog:
            self.intake.dispatch(self.pool, now)

    def refill(self, now: float) -> None:
        if self.state is not State.RUNNING or self.paused:
            return
        self.pool.spawn_missing()
        n = self.intake.next_pull(self.concurrency, self.pool.busy_count(), now)
        if n:
            self.io.puller.request(n)

    # == stopping ==============================================================================
    def begin_drain(self) -> None:
        now = self.clock()
        self.state = State.DRAINING
        self.io.puller.stop()
        unstarted = self.backlog.take_all()
        for inflight in unstarted:
            self.settler.give_back(inflight)
        drain, shutdown = self.settings.shutdown.drain_timeout, self.settings.shutdown
        self.drain_deadline = now + drain
        self.notifier.stopping(self.reporter.status_text(self.state.value))
        self.notifier.extend_timeout(drain + shutdown.kill_grace + shutdown.flush_timeout)
        self.log.info("drain.started", running=self.pool.busy_count(), given_back=len(unstarted), drain_timeout=drain)

    def stop_running_tasks(self, reason: KillReason, grace: float) -> None:
        now = self.clock()
        self.state = State.STOPPING
        self.drain_deadline = None
        self.stop_deadline = now + grace + 5.0  # exit even if an exit status never arrives
        self.pool.kill_busy(reason, now, grace)

    def advance_shutdown(self, now: float) -> None:
        if self.state is State.DRAINING and not self.pool.busy_count() and not self.settler.dead_lettering():
            self.state = State.STOPPED
        elif self.state is State.DRAINING and self.drain_deadline is not None and now >= self.drain_deadline:
            self.log.warning("drain.timeout", running=self.pool.busy_count())
            self.stop_running_tasks(KillReason.DRAIN_TIMEOUT, self.settings.shutdown.kill_grace)
        elif self.state is State.STOPPING and (not self.pool.busy_count() or now >= (self.stop_deadline or now)):
            self.state = State.STOPPED

    def fail(self, reason: str, exit_code: ExitCode = ExitCode.SOFTWARE) -> None:
        """A fatal error in the loop: stop quickly, give every message back, exit 70 (or ``exit_code``)."""
        self.log.error("daemon.fatal", error=reason, exit_code=int(exit_code))
        self.exit_code = exit_code
        if self.state in (State.RUNNING, State.DRAINING):
            self.io.puller.stop()
            for inflight in self.backlog.take_all():
                self.settler.give_back(inflight)
        self.stop_running_tasks(KillReason.FATAL, QUICK_STOP_GRACE)

    def shutdown(self) -> None:
        """Give back what is still held, then stop what was started (acks flushed). Always runs."""
        now = self.clock()
        with self.safety.guard("shutdown"):
            for inflight in self.pool.running():
                self.settler.settle(inflight, Outcome.SHUTDOWN, now, error="daemon stopped before the task ended")
            for inflight in [*self.pool.queued(), *self.backlog.take_all(), *self.settler.take_forwarding()]:
                self.settler.give_back(inflight)
        self.resources.close()
        self.state = State.STOPPED
        self.notifier.status("stopped")
        self.log.info(
            "daemon.stopped",
            **dataclasses.asdict(self.counters),
            rpcs=self.pubsub.rpcs.counts,
            notify_dropped=self.notifier.dropped,
            exit_code=int(self.exit_code),
        )

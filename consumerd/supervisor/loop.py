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
from consumerd.adapters.systemd import Notifier
from consumerd.config import Settings
from consumerd.control.commands import Steering
from consumerd.errors import ExitCode
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import Outcome
from consumerd.logsetup import batched_log_lines, flush_logs, get_logger
from consumerd.policy.flow import Ewma
from consumerd.pool.handles import EXIT_CAUSES, KillReason, PoolEvent, WorkerExited, WorkerResult, WorkerStarted
from consumerd.pool.pool import ForkServerDied, fork_server_spec
from consumerd.supervisor.codereload import CodeReload
from consumerd.supervisor.components import Components
from consumerd.supervisor.descriptors import check_concurrency, max_concurrency, raise_nofile
from consumerd.supervisor.intake import STALL
from consumerd.supervisor.reload import Reloader, ReloadPlan
from consumerd.supervisor.reporter import Reporter
from consumerd.supervisor.safety import SafetyNet
from consumerd.supervisor.settler import Counters, Settler
from consumerd.supervisor.signals import SignalQueue
from consumerd.supervisor.stream import Stream, Streams
from consumerd.supervisor.throttle import Throttle

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
        watch_code: bool = False,  # `consumerd run --reload`: new workers when a task module's file changes
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
        self.counters = Counters()  # the daemon's own (errors the safety net caught); each subscription counts its messages
        self.metrics = Metrics(__version__, lambda: self.streams.rpc_counts(), EXIT_CAUSES) if settings.metrics.listen else NullMetrics()
        self.safety = SafetyNet(self.settler_of, self.counters, self.log, clock, self.on_errors_exhausted)
        throttle, durations = Throttle(settings, self.metrics), Ewma()  # the host's rate limits and task lengths: shared
        streams = [
            Stream(spec, self.components, self.metrics.for_subscription(spec.name), self.log, self.safety.caught, throttle, durations)
            for spec in settings.streams()
        ]
        self.streams = Streams(streams, settings, throttle, self.log, self.metrics)
        self.pool = self.components.pool(fork_server_spec(settings), settings.workers.concurrency, self.forget_fd)
        self.code = CodeReload(self.pool, self.streams, self.metrics, self.selector, clock, self.log, self.reloaded, watch_code)
        self.reporter = Reporter(self.notifier, self.metrics, self.pool, self.streams)
        self.steering = Steering(self, self.selector, clock, self.forget_fd, self.log)
        self.drain_deadline: float | None = None
        self.stop_deadline: float | None = None
        self._next_housekeeping = 0.0

    # == the table of contents =================================================================
    def run(self) -> ExitCode:
        try:
            set_title(f"supervisor [{', '.join(s.name for s in self.streams)}]")
            self.signals.install(self.selector)
            self.start_observability()
            self.start_pool()
            self.connect_pubsub()
            if self.await_workers():
                self.start_io_threads()
                self.notify_ready()
                with batched_log_lines():
                    while self.state is not State.STOPPED:
                        with self.safety.guard("loop"):
                            self.tick()
        finally:
            self.shutdown()
        return self.exit_code

    def tick(self) -> None:
        now = self.clock()
        self.streams.ticked(now)
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
        stalled = now - self._next_housekeeping > STALL  # the loop was frozen (SIGSTOP, a VM pause)
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self.pool.kill_overdue(now)
        self.pool.escalate_kills(now)
        self.streams.housekeeping(now, stalled)
        self.reporter.housekeeping(now, self.state.value, self.concurrency)
        self.steering.drop_stale(now)

    # == start-up ==============================================================================
    def start_observability(self) -> None:
        """Metrics, probes and the control socket first: they answer while the rest starts."""
        self.reporter.serve(self.settings.metrics, self.streams.paths, self.resources, self.log)
        self.steering.listen(self.settings.control.socket_path(), self.settings.control.group, self.resources)

    def start_pool(self) -> None:
        nofile = raise_nofile()
        check_concurrency(self.concurrency, nofile)
        self.max_concurrency = min(max_concurrency(nofile), 1024)
        self.resources.callback(self.pool.stop)
        self.code.start(self.settings, self.resources)  # the fork server imports the task code: the tasks
        self.selector.register(self.pool.control_fd, selectors.EVENT_READ, self._on_control_readable)
        self.pool.spawn_missing()
        self.log.info("workers.starting", concurrency=self.concurrency, tasks=sorted(self.streams.all[0].intake.task_names), nofile=nofile)

    def connect_pubsub(self) -> None:
        """Check every subscription exists; retry while Pub/Sub is unreachable, up to startup_timeout."""
        for stream in self.streams:
            self.resources.callback(stream.pubsub.close)
            if not stream.connect(self.clock, self.wait_or_stop):
                return  # asked to stop while waiting

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
        self.streams.throttle.start(self.selector, self.resources)
        for stream in self.streams:
            stream.start_io(self.selector, self.resources, lambda: self.settings.shutdown.flush_timeout)

    def notify_ready(self) -> None:
        self.state = State.RUNNING
        self.streams.ticked(self.clock())
        self.reporter.announce_ready(self.clock(), self.streams.paused(), self.streams.paths, self.concurrency, self.log)

    # == the loop ==============================================================================
    def wait_for_events(self, timeout: float | None = None) -> None:
        self.reporter.tick(self.clock(), self.state.value, self.streams.paused())
        if timeout is None:
            timeout = max(0.0, self.next_wakeup() - self.clock())
        flush_logs()  # this pass's lines, in one write
        for key, _ in self.selector.select(timeout):
            with self.safety.guard("event"):
                key.data()

    def next_wakeup(self) -> float:
        now = self.clock()
        # Something is due soon (a lease, a timeout, a kill, the watchdog): look again at the next
        # housekeeping time; otherwise sleep until an event or MAX_SLEEP.
        candidates = [*self.streams.next_due(now), self.pool.next_deadline(), self.notifier.watchdog_due(now)]
        candidates += [self.drain_deadline, self.stop_deadline]
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
                    self.streams.worker_exited(event, now, self.state is State.RUNNING)
                    if event.start_hook_failed:
                        self.fail("a worker's on_worker_start hook failed (worker.start_hook_failed)", ExitCode.CONFIG)
            elif self.state is State.RUNNING:  # new task code loaded (or failed to), or an old generation ended
                self.code.on_generation(event, now)

    def on_result(self, event: WorkerResult, now: float) -> None:
        stream = self.streams.of(event.inflight)
        stream.intake.task_ran(event.ran_for)
        stream.settler.finished(event.inflight, event.result, now)
        self.pool.retire_surplus()

    def settler_of(self, inflight: InFlight) -> Settler:
        return self.streams.of(inflight).settler

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
        """Reload: re-read the config, apply what can change at run time, refuse the rest; changed task code first loads in new workers."""
        if self.state is State.RUNNING and self.reloader.enabled:
            self.notifier.reloading()
            self.code.reload(self.reloader.reload(self.settings, self.max_concurrency, self.log), self.clock())

    def reloaded(self, plan: ReloadPlan | None) -> None:
        """A reload is over (now, or once its new code is ready): run with its settings (None: rejected)."""
        if plan is not None:
            self.apply_settings(self.reloader.finish(plan, self.log))
        self.notifier.ready(self.reporter.status_text(self.state.value))

    def apply_settings(self, settings: Settings) -> None:
        """Run with ``settings`` from now on; running tasks keep the timeout they started with."""
        self.settings = settings
        self.streams.apply(settings)
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
        return self.reporter.status(self.clock(), self.state.value, self.concurrency, self.streams.paused())

    def set_paused(self, paused: bool, subscription: str = "") -> None:
        """Pull no more (or again): every subscription, or the one named (LookupError if none is)."""
        for stream in self.streams.chosen(subscription):
            stream.paused = paused
            stream.log.info("daemon.paused" if paused else "daemon.resumed", running=stream.running(), queued=len(stream.backlog))

    def drain(self, subscription: str = "") -> None:
        """What SIGTERM does, on the next tick; of one subscription: it pulls no more, for good."""
        if not subscription:
            self.signals.record(signal.SIGTERM)
            return
        for stream in self.streams.chosen(subscription):
            stream.log.info("drain.subscription", given_back=stream.stop_pulling(), running=stream.running())
        if not any(stream.pulling for stream in self.streams):
            self.signals.record(signal.SIGTERM)  # the last one: the daemon drains

    def resize(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.pool.resize(concurrency)

    # == messages in ===========================================================================
    def collect_inbox(self, now: float) -> None:
        self.streams.collect(now, self.state is State.RUNNING)

    def dispatch(self, now: float) -> None:
        if self.state is State.RUNNING:
            self.streams.dispatch(self.pool, now)

    def refill(self, now: float) -> None:
        if self.state is State.RUNNING:
            self.pool.spawn_missing()
            self.streams.refill(self.concurrency, now)

    # == stopping ==============================================================================
    def begin_drain(self) -> None:
        now = self.clock()
        self.state = State.DRAINING
        given_back = self.streams.stop_pulling()
        drain, shutdown = self.settings.shutdown.drain_timeout, self.settings.shutdown
        self.drain_deadline = now + drain
        self.notifier.stopping(self.reporter.status_text(self.state.value))
        self.notifier.extend_timeout(drain + shutdown.kill_grace + shutdown.flush_timeout)
        self.log.info("drain.started", running=self.pool.busy_count(), given_back=given_back, drain_timeout=drain)

    def stop_running_tasks(self, reason: KillReason, grace: float) -> None:
        now = self.clock()
        self.state = State.STOPPING
        self.drain_deadline = None
        self.stop_deadline = now + grace + 5.0  # exit even if an exit status never arrives
        self.pool.kill_busy(reason, now, grace)

    def advance_shutdown(self, now: float) -> None:
        if self.state is State.DRAINING and not self.pool.busy_count() and not self.streams.publishing():
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
            self.streams.stop_pulling()
        self.stop_running_tasks(KillReason.FATAL, QUICK_STOP_GRACE)

    def shutdown(self) -> None:
        """Give back what is still held, then stop what was started (acks flushed). Always runs."""
        now = self.clock()
        with self.safety.guard("shutdown"):
            for inflight in self.pool.running():
                self.settler_of(inflight).settle(inflight, Outcome.SHUTDOWN, now, error="daemon stopped before the task ended")
            for inflight in self.pool.queued():
                self.settler_of(inflight).give_back(inflight)
            self.streams.give_back_held()
        self.resources.close()
        self.state = State.STOPPED
        self.notifier.status("stopped")
        self.log.info(
            "daemon.stopped",
            **dataclasses.asdict(self.streams.total(self.counters)),
            rpcs=self.streams.rpc_counts()[0],
            notify_dropped=self.notifier.dropped,
            exit_code=int(self.exit_code),
        )

"""One subscription the daemon serves, and the set of them sharing the worker pool.

A `Stream` is what a one-subscription daemon was: its own Pub/Sub client and I/O threads (puller,
acker, dead-letter forwarder, output publisher), inbox, backlog and byte budget, leases and
`Settler`, `Intake` and counters, all built from that subscription's own settings
(`Settings.streams`). What they share is the pool, whose free slots `Streams.dispatch` hands out by
weighted fair share (`policy.fairshare`), and the loop. A failure of one subscription's RPCs stays
in its stream: its puller retries while the others go on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import selectors
from collections.abc import Callable, Iterator

from structlog.stdlib import BoundLogger

from consumerd.adapters.prometheus import MetricsSink
from consumerd.adapters.pubsub.connection import connect
from consumerd.adapters.pubsub.puller import PullResult
from consumerd.config import Settings
from consumerd.config.settings import StreamSettings
from consumerd.ipc.held import InFlight
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.records import TaskOptions
from consumerd.policy.backlog import Backlog
from consumerd.policy.fairshare import Share, next_turn
from consumerd.policy.flow import Ewma
from consumerd.pool.pool import Pool, WorkerExited
from consumerd.supervisor.components import Components
from consumerd.supervisor.intake import Intake, OnError
from consumerd.supervisor.settler import Counters, Settler
from consumerd.supervisor.throttle import Throttle


class Stream:
    def __init__(
        self,
        spec: StreamSettings,
        components: Components,
        metrics: MetricsSink,
        log: BoundLogger,
        on_error: OnError,
        throttle: Throttle,
        task_seconds: Ewma,
    ) -> None:
        self.path = spec.path
        self.name = spec.name
        self.settings = spec.settings
        self.log = log.bind(subscription=spec.name)
        self.inbox = Inbox()
        self.pubsub = components.pubsub(spec.settings)
        self.io = components.io_threads(self.pubsub, spec.settings, self.inbox)
        self.backlog = Backlog(max_running_bytes=spec.settings.flow.max_inflight_bytes)
        self.counters = Counters()
        self.settler = Settler.of(spec.settings, self.io, self.backlog, self.counters, self.log, metrics)
        self.intake = Intake(spec.settings, self.settler, self.backlog, on_error, throttle, task_seconds)
        self.share = Share(spec.weight, spec.max_concurrency)
        self.paused = False  # `consumerd pause [--subscription]`: no pulls; what is here runs on
        self.pulling = True  # False once drained: its puller stopped for good

    # -- start-up ------------------------------------------------------------------------------
    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        self.intake.set_tasks(tasks)

    def connect(self, clock: Callable[[], float], wait_or_stop: Callable[[float], bool]) -> bool:
        """Check the subscription exists (ConfigError naming it if not); False if asked to stop."""
        info = connect(self.pubsub, self.settings, clock, wait_or_stop, self.log)
        if info is None:
            return False
        self.intake.subscribed(info.ack_deadline)
        self.backlog.configure(ordered=info.ordering)
        return True

    def start_io(self, selector: selectors.BaseSelector, resources: contextlib.ExitStack, flush_timeout: Callable[[], float]) -> None:
        selector.register(self.inbox.fd, selectors.EVENT_READ, lambda: None)  # read in `collect`
        self.io.start(resources, flush_timeout, self.log)

    # -- the loop ------------------------------------------------------------------------------
    def collect(self, now: float, running: bool) -> None:
        for item in self.inbox.take_all():
            if isinstance(item, PullResult):
                self.intake.pulled(item.asked, item.received, now, running and not self.paused and self.pulling, item.sent_at)
            else:  # a dead-letter copy or a task's outputs were published, or could not be
                self.settler.on_io(item, now)

    def housekeeping(self, now: float, stalled: bool) -> None:
        if stalled:  # before renewing: a renewal would make a lapsed lease look alive
            self.intake.drop_lapsed(now)
        self.settler.renew_leases(now)
        self.intake.prune(now)

    def due(self, now: float) -> list[float | None]:
        return [self.settler.next_renewal(), self.intake.next_batch_due(), self.intake.next_token_due(now)]

    def running(self) -> int:
        """Its messages on workers (running, or queued behind a running one)."""
        return self.backlog.running_count()

    def refill(self, concurrency: int, now: float) -> None:
        """Ask for more messages: for as many workers as it may use (its cap, else all of them).
        Each subscription keeps a backlog ready for the whole pool, so it has a message at hand
        whenever its share frees a slot (a backlog that ran dry between pulls would lend its slots
        to the others: the weights would not hold). The cost: a daemon holds that much per
        subscription (about one pull and prefetch each)."""
        if self.paused or not self.pulling:
            return
        workers = min(concurrency, self.share.cap) if self.share.cap else concurrency
        if n := self.intake.next_pull(workers, self.running(), now):
            self.io.puller.request(n)

    def apply(self, settings: Settings) -> None:
        self.settings = settings
        self.intake.apply(settings)
        self.settler.apply(settings)
        self.backlog.configure(max_running_bytes=settings.flow.max_inflight_bytes)

    # -- stopping ------------------------------------------------------------------------------
    def stop_pulling(self) -> int:
        """Drain this subscription: no more pulls; what waits here is given back (no attempt used).
        Returns how many were given back. Running tasks end as usual."""
        if self.pulling:
            self.pulling = False
            self.io.puller.stop()
        unstarted = self.backlog.take_all()
        for inflight in unstarted:
            self.settler.give_back(inflight)
        return len(unstarted)

    def settled(self) -> bool:
        """Nothing of it runs or waits for a publish any more."""
        return not self.running() and not self.settler.publishing()

    def status(self) -> dict[str, object]:
        return {
            "subscription": self.path,
            "weight": self.share.weight,
            "max_concurrency": self.share.cap,
            "paused": self.paused,
            "pulling": self.pulling,
            "running": self.running(),
            "queued": len(self.backlog),
            "dead_lettering": self.settler.dead_lettering(),
            "publishing_outputs": self.settler.publishing() - self.settler.dead_lettering(),
            "held_bytes": self.backlog.held_bytes,
            "counters": dict(vars(self.counters)),
            "pull_error": self.io.puller.last_error,
        }


class Streams:
    """Every subscription served, in config order; what the loop does to all of them at once."""

    def __init__(self, streams: list[Stream], settings: Settings, throttle: Throttle, log: BoundLogger, metrics: MetricsSink) -> None:
        self.all = streams
        self.settings = settings  # the daemon's, for what all subscriptions share (the rate limits)
        self.throttle = throttle
        self.log = log
        self.metrics = metrics
        self._by_path = {s.path: s for s in streams}
        self._passes = 0

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.all]

    def paused(self) -> bool:
        return all(s.paused for s in self.all)

    # -- start-up ------------------------------------------------------------------------------
    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None:
        """The task table of the code the workers run, for every subscription (`check_tasks` vetted
        it first, against the settings it will run with)."""
        for stream in self.all:
            stream.set_tasks(tasks)
        self.throttle.set_tasks(tasks, self.settings)

    def check_tasks(self, tasks: dict[str, TaskOptions], settings: Settings) -> None:
        """What `set_tasks` would refuse for new code under ``settings`` (ConfigError), changing nothing."""
        for spec in settings.streams():
            spec.settings.check_task_names(frozenset(tasks))

    def apply(self, settings: Settings) -> None:
        self.settings = settings
        self.throttle.apply(settings)
        for stream, spec in zip(self.all, settings.streams(), strict=True):  # [[subscriptions]] is fixed on reload
            stream.apply(spec.settings)

    # -- the loop ------------------------------------------------------------------------------
    def ticked(self, now: float) -> None:
        for stream in self.all:
            stream.intake.ticked(now)

    def collect(self, now: float, running: bool) -> None:
        self.throttle.collect(now)
        for stream in self.all:
            stream.collect(now, running)

    def housekeeping(self, now: float, stalled: bool) -> None:
        for stream in self.all:
            stream.housekeeping(now, stalled)

    def refill(self, concurrency: int, now: float) -> None:
        for stream in self.all:
            stream.refill(concurrency, now)

    def worker_exited(self, event: WorkerExited, now: float, running: bool) -> None:
        """A worker died or retired: what it ran did not succeed, what it had not started goes back
        in line (given back when we are stopping), each in its own subscription."""
        crashed = bool(event.lost) or event.exit_code != 0
        (self.log.warning if crashed else self.log.debug)(
            "worker.exited",
            worker_pid=event.worker.pid,
            reason=event.reason,
            kill_reason=event.kill_reason.value if event.kill_reason else None,
            exit_code=event.exit_code,
            tasks_done=event.worker.tasks_done,
            lost=len(event.lost),
            requeued=len(event.unstarted),
        )
        self.metrics.worker_exited(event.cause)
        for stream in self.all:
            stream.intake.requeue([i for i in event.unstarted if i.message.subscription == stream.path], running)
            stream.settler.lost([lost for lost in event.lost if lost.inflight.message.subscription == stream.path], event.reason, now)

    # -- stopping ------------------------------------------------------------------------------
    def stop_pulling(self) -> int:
        return sum(stream.stop_pulling() for stream in self.all)

    def give_back_held(self) -> None:
        """At shutdown: what waits here or for a publish goes back to Pub/Sub."""
        for stream in self.all:
            for inflight in [*stream.backlog.take_all(), *stream.settler.take_publishing()]:
                stream.settler.give_back(inflight)

    def __iter__(self) -> Iterator[Stream]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def of(self, inflight: InFlight) -> Stream:
        """The stream a held message came from (the path `Message.subscription` carries)."""
        return self._by_path[inflight.message.subscription]

    def chosen(self, name: str) -> list[Stream]:
        """Every stream (``name`` empty), or the one named by short name or full path (LookupError if none)."""
        if not name:
            return self.all
        found = self._by_path.get(name) or next((s for s in self.all if s.name == name), None)
        if found is None:
            raise LookupError(f"no subscription {name!r} here (serving: {', '.join(s.name for s in self.all)})")
        return [found]

    def dispatch(self, pool: Pool, now: float) -> None:
        """Start what may start. One subscription with messages waiting takes what it may (up to
        its cap); several take turns slot by slot, by weighted fair share, until none can start more."""
        waiting = [s for s in self.all if s.backlog]
        if len(waiting) == 1 and not waiting[0].share.cap:
            waiting[0].intake.dispatch(pool, now)
        elif waiting:
            self._take_turns(pool, now, waiting)
        pool.flush(now)

    def _take_turns(self, pool: Pool, now: float, waiting: list[Stream]) -> None:
        shares = {s.path: s.share for s in waiting}
        candidates = {s.path for s in waiting}
        for stream in waiting:
            stream.share.running = stream.running()
        while (path := next_turn(shares, candidates)) is not None:
            stream = self._by_path[path]
            if not stream.intake.dispatch(pool, now, limit=1):
                candidates.discard(path)  # no worker for its next message, or nothing it may start
            else:
                self._passes += 1
                stream.share.running = stream.running()
                stream.share.served_at = self._passes
            if not stream.backlog:
                candidates.discard(path)

    def next_due(self, now: float) -> list[float | None]:
        return [due for s in self.all for due in s.due(now)]

    def settled(self) -> bool:
        return all(s.settled() for s in self.all)

    def publishing(self) -> int:
        return sum(s.settler.publishing() for s in self.all)

    def rpc_counts(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """Every subscription's Pub/Sub RPCs, added up: calls by RPC, failures by RPC and code."""
        calls: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[tuple[str, str]] = collections.Counter()
        for stream in self.all:
            ok, failed = stream.pubsub.rpcs.snapshot()
            calls.update(ok)
            errors.update(failed)
        return dict(calls), dict(errors)

    def total(self, own: Counters) -> Counters:
        """The daemon's own counters and every subscription's, added up (for `daemon.stopped`)."""
        total = dataclasses.replace(own)
        for stream in self.all:
            for name, value in vars(stream.counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

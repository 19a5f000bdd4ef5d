"""The Prometheus adapter: the daemon's metrics, and what the HTTP thread answers on /metrics, /healthz, /readyz.

The loop thread updates the metrics (prometheus-client objects: thread-safe and cheap to update)
and publishes a `Health` snapshot each tick; the HTTP thread (`probes.ProbeServer`) only reads. With
`[metrics] listen = ""` the daemon uses `NullMetrics`: the same methods doing nothing, no thread.
Task labels come from the registry's names (a bounded set); any other name is labelled `unknown`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from consumerd.adapters.probes import ProbeServer, response
from consumerd.errors import ConfigError
from consumerd.ipc.records import Outcome

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ATTEMPT_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100)
STATES = ("starting", "running", "draining", "stopping", "stopped")
HEALTHY_WITHIN = 5.0  # seconds since the last tick: the loop wakes at least once a second


@dataclasses.dataclass(frozen=True)
class Health:
    """What the probes answer from: published by the loop, read by the HTTP thread."""

    tick_at: float = 0.0  # time.monotonic() of the last tick
    state: str = "starting"
    ready: bool = False  # READY was reached
    paused: bool = False
    pull_error: str = ""  # the last pull failed with this (empty: it succeeded)

    def live(self, now: float) -> bool:
        # Start-up (importing task modules, waiting for Pub/Sub) has timeouts of its own.
        return self.state == "starting" or now - self.tick_at < HEALTHY_WITHIN

    def not_ready_because(self) -> str:
        """Empty when ready; otherwise a one-line reason."""
        if not self.ready:
            return "starting"
        if self.state != "running":
            return self.state
        if self.paused:
            return "paused"
        if self.pull_error:
            return f"Pub/Sub unreachable: {self.pull_error}"
        return ""


class MetricsSink(Protocol):
    """What the loop records its events through: `Metrics`, or `NullMetrics` when nothing is served."""

    def known_tasks(self, names: frozenset[str]) -> None: ...

    def outcome(self, task: str, outcome: str) -> None: ...

    def ran(self, task: str, seconds: float) -> None: ...

    def received(self, attempt: int) -> None: ...

    def forwarded(self, task: str) -> None: ...

    def dead_letter_failed(self, task: str) -> None: ...

    def outputs_published(self, task: str, count: int) -> None: ...

    def outputs_failed(self, task: str) -> None: ...

    def worker_exited(self, cause: str) -> None: ...

    def renewed(self, leases: int) -> None: ...

    def lapsed(self) -> None: ...

    def rate_limit_waited(self, task: str, seconds: float) -> None: ...

    def rate_limit_fallback(self, active: bool) -> None: ...

    def gauges(self, *, running: int, workers: int, concurrency: int, held: int, held_bytes: int, state: str) -> None: ...

    def subscription_gauges(self, subscription: str, *, running: int, held: int) -> None: ...

    def for_subscription(self, name: str) -> MetricsSink: ...

    def publish_health(self, health: Health) -> None: ...


class Metrics:
    def __init__(
        self,
        version: str,
        rpc_counts: Callable[[], tuple[dict[str, int], dict[tuple[str, str], int]]],
        exit_causes: Iterable[str],
    ) -> None:
        """``exit_causes``: the worker exit causes whose series exist from the start, at 0 (the
        pool's bounded set; a cause not listed gets its series when it first happens)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks: frozenset[str] = frozenset()
        self.exit_causes = tuple(exit_causes)
        self.subscriptions: tuple[str, ...] = ()
        self.messages = Counter(
            "consumerd_messages",
            "Messages by subscription, task and how their attempt ended",
            ["subscription", "task", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "consumerd_task_duration_seconds", "Time a task function ran", ["task"], buckets=DURATION_BUCKETS, registry=r
        )
        self.running = Gauge("consumerd_tasks_running", "Tasks running in workers now", registry=r)
        self.workers = Gauge("consumerd_workers", "Worker processes", registry=r)
        self.concurrency = Gauge("consumerd_concurrency", "Configured concurrency (workers)", registry=r)
        self.held = Gauge("consumerd_messages_held", "Messages pulled and queued here, not yet running", registry=r)
        self.held_bytes = Gauge("consumerd_held_bytes", "Bytes of every message held (queued, running, dead-lettering)", registry=r)
        self.attempt = Histogram("consumerd_delivery_attempt", "Delivery attempt of pulled messages", buckets=ATTEMPT_BUCKETS, registry=r)
        per = ["subscription", "task"]
        self.dead_lettered = Counter("consumerd_dead_lettered", "Messages forwarded to the dead-letter topic", per, registry=r)
        self.dead_letter_failures = Counter(
            "consumerd_dead_letter_failed", "Dead-letter copies that could not be published", per, registry=r
        )
        self.outputs = Counter("consumerd_outputs_published", "Task outputs (consumerd.publish) Pub/Sub accepted", per, registry=r)
        self.output_failures = Counter(
            "consumerd_output_publish_failures", "Task calls whose outputs could not be published (input retried)", per, registry=r
        )
        self.subscription_running = Gauge(
            "consumerd_subscription_running", "Messages of the subscription on workers now", ["subscription"], registry=r
        )
        self.subscription_held = Gauge(
            "consumerd_subscription_held", "Messages of the subscription queued here, not yet running", ["subscription"], registry=r
        )
        self.worker_exits = Counter("consumerd_worker_exits", "Worker exits by cause", ["cause"], registry=r)
        self.lease_renewals = Counter("consumerd_lease_renewals", "Leases extended", registry=r)
        self.lease_lapsed = Counter("consumerd_lease_lapsed", "Queued messages dropped because their lease ran out", registry=r)
        self.rate_limit_wait = Histogram(
            "consumerd_rate_limit_wait_seconds", "Time messages waited for a rate limit", ["task"], buckets=DURATION_BUCKETS, registry=r
        )
        self.rate_limit_fallback_active = Gauge(
            "consumerd_rate_limit_fallback", "1 while Redis is unreachable and this daemon applies its share of each limit", registry=r
        )
        self.rate_limit_fallbacks = Counter("consumerd_rate_limit_fallbacks", "Times Redis became unreachable (outages)", registry=r)
        self.utilization = Gauge("consumerd_utilization", "Busy worker slots / concurrency", registry=r)
        self.state = Gauge("consumerd_state", "1 for the daemon's current state", ["state"], registry=r)
        Info("consumerd_build", "consumerd version", registry=r).info({"version": version})
        ProcessCollector(registry=r)
        r.register(_RpcCollector(rpc_counts))
        self.health = Health()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: the label sets are bounded (known tasks, outcomes,
        subscriptions, exit causes) and `labels()` costs several times a counter's `inc()`."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def for_subscription(self, name: str) -> MetricsSink:
        """The sink for one subscription's parts: its series carry ``subscription=name``."""
        self.subscriptions = (*self.subscriptions, name)
        return cast(MetricsSink, SubscriptionMetrics(self, name))

    def known_tasks(self, names: frozenset[str]) -> None:
        """Every known series exists from the start, at 0: rate() and alerts see the first event."""
        self.tasks = names
        for name in (*names, "unknown"):
            self.duration.labels(name)
            for subscription in self.subscriptions:
                self.dead_lettered.labels(subscription, name)
                self.dead_letter_failures.labels(subscription, name)
                self.outputs.labels(subscription, name)
                self.output_failures.labels(subscription, name)
                for outcome in Outcome:
                    self.messages.labels(subscription, name, outcome.value)
        for cause in self.exit_causes:
            self.worker_exits.labels(cause)

    def _task(self, name: str) -> str:
        return name if name in self.tasks else "unknown"

    # -- events, from the loop -----------------------------------------------------------------
    def outcome(self, task: str, outcome: str, subscription: str = "") -> None:
        self._child(self.messages, subscription, self._task(task), outcome).inc()

    def ran(self, task: str, seconds: float) -> None:
        self._child(self.duration, self._task(task)).observe(seconds)

    def received(self, attempt: int) -> None:
        self.attempt.observe(attempt)

    def forwarded(self, task: str, subscription: str = "") -> None:
        self._child(self.dead_lettered, subscription, self._task(task)).inc()

    def dead_letter_failed(self, task: str, subscription: str = "") -> None:
        self._child(self.dead_letter_failures, subscription, self._task(task)).inc()

    def outputs_published(self, task: str, count: int, subscription: str = "") -> None:
        self._child(self.outputs, subscription, self._task(task)).inc(count)

    def outputs_failed(self, task: str, subscription: str = "") -> None:
        self._child(self.output_failures, subscription, self._task(task)).inc()

    def subscription_gauges(self, subscription: str, *, running: int, held: int) -> None:
        self._child(self.subscription_running, subscription).set(running)
        self._child(self.subscription_held, subscription).set(held)

    def worker_exited(self, cause: str) -> None:
        self._child(self.worker_exits, cause).inc()

    def renewed(self, leases: int) -> None:
        self.lease_renewals.inc(leases)

    def lapsed(self) -> None:
        self.lease_lapsed.inc()

    def rate_limit_waited(self, task: str, seconds: float) -> None:
        self._child(self.rate_limit_wait, self._task(task)).observe(seconds)

    def rate_limit_fallback(self, active: bool) -> None:
        """Redis became unreachable (True: one more outage) or answers again (False)."""
        if active:
            self.rate_limit_fallbacks.inc()
        self.rate_limit_fallback_active.set(1 if active else 0)

    def gauges(self, *, running: int, workers: int, concurrency: int, held: int, held_bytes: int, state: str) -> None:
        self.running.set(running)
        self.workers.set(workers)
        self.concurrency.set(concurrency)
        self.held.set(held)
        self.held_bytes.set(held_bytes)
        self.utilization.set(running / concurrency if concurrency else 0.0)
        for name in STATES:
            self._child(self.state, name).set(1 if name == state else 0)

    def publish_health(self, health: Health) -> None:
        self.health = health  # one reference assignment: the HTTP thread sees the old or the new

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SubscriptionMetrics:
    """`Metrics` as one subscription's parts see it: the per-subscription series get its name."""

    def __init__(self, metrics: Metrics, subscription: str) -> None:
        self._metrics = metrics
        for name in PER_SUBSCRIPTION:  # made once: they run for every message
            setattr(self, name, functools.partial(getattr(metrics, name), subscription=subscription))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._metrics, name)
        if callable(attribute):
            setattr(self, name, attribute)  # looked up here once; data (`health`) is always read anew
        return attribute


PER_SUBSCRIPTION = frozenset({"outcome", "forwarded", "dead_letter_failed", "outputs_published", "outputs_failed"})


class NullMetrics:
    """`[metrics] listen = ""`: every method does nothing."""

    health = Health()

    def for_subscription(self, _name: str) -> NullMetrics:
        return self

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return _nothing


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


class _RpcCollector(Collector):
    """consumerd_rpc_total{rpc} and consumerd_rpc_errors_total{rpc,code}, read from the adapter's counts."""

    def __init__(self, counts: Callable[[], tuple[dict[str, int], dict[tuple[str, str], int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        calls, errors = self._counts()
        total = CounterMetricFamily("consumerd_rpc", "Pub/Sub RPCs sent", labels=["rpc"])
        for rpc, n in sorted(calls.items()):
            total.add_metric([rpc], n)
        failed = CounterMetricFamily("consumerd_rpc_errors", "Pub/Sub RPCs that failed, by gRPC status", labels=["rpc", "code"])
        for (rpc, code), n in sorted(errors.items()):
            failed.add_metric([rpc, code], n)
        yield total
        yield failed


class MetricsServer:
    """/metrics, /healthz and /readyz, served by a `ProbeServer` (a thread of its own that only reads)."""

    def __init__(self, metrics: Metrics, listen: str, clock: Callable[[], float] = time.monotonic, *, fallback: str | None = None) -> None:
        """``fallback``: where to listen instead when ``listen`` is taken (EADDRINUSE); None: a taken
        address is a ConfigError, as is every other failure to listen."""
        self.metrics = metrics
        self.server = self._listen(listen, fallback, clock)
        self.address = self.server.address  # the real one: port 0 and the fallback become the bound port

    def _listen(self, listen: str, fallback: str | None, clock: Callable[[], float]) -> ProbeServer:
        try:
            return ProbeServer(listen, self.route, clock)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and fallback is not None:
                return self._listen(fallback, None, clock)
            # The errno's own text: socket.create_server appends the address, which this line names already.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f'metrics.listen: cannot listen on {listen}: {reason} (choose another port, or "" to turn it off)') from None

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def route(self, path: bytes) -> bytes:
        if path == b"/metrics":
            return response(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        if path == b"/healthz":
            live = self.metrics.health.live(time.monotonic())
            status, body = (HTTPStatus.OK, b"ok\n") if live else (HTTPStatus.SERVICE_UNAVAILABLE, b"the loop has not ticked for 5 s\n")
            return response(status, body)
        if path == b"/readyz":
            reason = self.metrics.health.not_ready_because()
            return response(HTTPStatus.SERVICE_UNAVAILABLE if reason else HTTPStatus.OK, (reason or "ready").encode()[:300] + b"\n")
        return response(HTTPStatus.NOT_FOUND, b"not found: /metrics, /healthz, /readyz\n")

"""What the daemon tells the outside world about itself: systemd's STATUS= and watchdog, the
Prometheus gauges and probes, and the `consumerd status` answer. Reads the loop's parts, changes none.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.adapters.prometheus import Health, Metrics, MetricsServer, MetricsSink
from consumerd.adapters.systemd import Notifier
from consumerd.policy.backlog import Backlog
from consumerd.pool.pool import Pool
from consumerd.supervisor.settler import Settler

STATUS_INTERVAL = 2.0  # seconds between STATUS= updates and gauge refreshes


class Reporter:
    def __init__(self, notifier: Notifier, metrics: MetricsSink, pool: Pool, backlog: Backlog, settler: Settler, puller: Any) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.pool = pool
        self.backlog = backlog
        self.settler = settler
        self.puller = puller
        self.started_at = time.monotonic()
        self.ready = False
        self._next_status = 0.0

    def serve(self, listen: str, resources: contextlib.ExitStack, log: BoundLogger) -> None:
        """Start the HTTP thread for /metrics, /healthz and /readyz (with ``listen`` set)."""
        if listen and isinstance(self.metrics, Metrics):
            server = MetricsServer(self.metrics, listen)
            server.start()
            resources.callback(server.stop)
            log.info("metrics.listening", address=server.address)

    def announce_ready(self, now: float, paused: bool, subscription: str, concurrency: int, log: BoundLogger) -> None:
        """Ready to the probes, READY=1 to systemd, daemon.ready to the log: in that order, so that
        whoever saw READY=1 or the log line finds /readyz ready too, without waiting for a tick."""
        self.ready = True
        self.tick(now, "running", paused)
        self.notifier.ready(self.status_text("running"))
        log.info(
            "daemon.ready",
            subscription=subscription,
            concurrency=concurrency,
            systemd=self.notifier.enabled,
            watchdog_s=self.notifier.watchdog_interval,
        )

    def tick(self, now: float, state: str, paused: bool) -> None:
        """Every tick: the probes' snapshot (one small immutable object)."""
        self.metrics.publish_health(Health(now, state, self.ready, paused, self.puller.last_error))

    def housekeeping(self, now: float, state: str, concurrency: int) -> None:
        self.notifier.ping_watchdog(now)
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self.notifier.status(self.status_text(state))
            self.refresh_gauges(state, concurrency)

    def refresh_gauges(self, state: str, concurrency: int) -> None:
        self.metrics.gauges(
            running=self.pool.busy_count(),
            workers=self.pool.worker_count(),
            concurrency=concurrency,
            held=len(self.backlog),
            held_bytes=self.backlog.held_bytes,
            state=state,
        )

    def status_text(self, state: str) -> str:
        c = self.settler.counters
        return (
            f"{state}: {self.pool.busy_count()} running, {len(self.backlog)} queued, "
            f"{c.succeeded} succeeded, {c.failed} failed, {self.pool.worker_count()} workers"
        )

    def status(self, now: float, state: str, concurrency: int, paused: bool) -> dict[str, Any]:
        """The `consumerd status` answer: plain data, JSON-ready."""
        c = self.settler.counters
        return {
            "state": state,
            "paused": paused,
            "uptime_s": round(now - self.started_at, 1),
            "concurrency": concurrency,
            "workers": self.pool.worker_count(),
            "running": [
                {
                    "worker_pid": job.pid,
                    "task": job.inflight.task,
                    "message_id": job.inflight.message.message_id,
                    "attempt": job.inflight.attempt,
                    "running_s": round(max(0.0, now - job.started_at), 3),
                    "rss_kb": _rss_kb(job.pid),
                }
                for job in self.pool.jobs()
            ],
            "queued": len(self.backlog),
            "dead_lettering": self.settler.dead_lettering(),
            "held_bytes": self.backlog.held_bytes,
            "counters": dict(vars(c)),
            "pull_error": self.puller.last_error,
        }


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None

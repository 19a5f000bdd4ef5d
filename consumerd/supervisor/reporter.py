"""What the daemon tells the outside world about itself: systemd's STATUS= and watchdog, the
Prometheus gauges and probes, and the `consumerd status` answer. Reads the loop's parts, changes none.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.adapters.discovery import TargetFile
from consumerd.adapters.prometheus import Health, Metrics, MetricsServer, MetricsSink
from consumerd.adapters.systemd import Notifier
from consumerd.config.operations import MetricsSettings
from consumerd.pool.pool import Pool
from consumerd.supervisor.settler import Counters
from consumerd.supervisor.stream import Streams

STATUS_INTERVAL = 2.0  # seconds between STATUS= updates and gauge refreshes


class Reporter:
    def __init__(self, notifier: Notifier, metrics: MetricsSink, pool: Pool, streams: Streams) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.pool = pool
        self.streams = streams
        self.started_at = time.monotonic()
        self.ready = False
        self._next_status = 0.0

    def serve(self, settings: MetricsSettings, subscriptions: list[str], resources: contextlib.ExitStack, log: BoundLogger) -> None:
        """Start the HTTP thread for /metrics, /healthz and /readyz (with `listen` set), and name its
        address in the file_sd target file, if there is one."""
        if not (settings.listen and isinstance(self.metrics, Metrics)):
            return
        server = MetricsServer(self.metrics, settings.listen, fallback=settings.fallback())
        server.start()
        resources.callback(server.stop)
        path = settings.file_sd_path()
        registered = path is not None and self.register(TargetFile(path), server.address, subscriptions, resources, log)
        log.info("metrics.listening", address=server.address, requested=settings.listen, file_sd=str(path) if registered else "")

    def register(
        self, target: TargetFile, address: str, subscriptions: list[str], resources: contextlib.ExitStack, log: BoundLogger
    ) -> bool:
        """Write the target file (removed again at shutdown, before the server stops); False if it
        could not be written, which costs discovery, never the daemon."""
        try:
            target.write(address, {"subscriptions": ",".join(path.rpartition("/")[2] for path in subscriptions)})
        except OSError as exc:
            log.warning("metrics.file_sd_failed", path=str(target.path), error=str(exc))
            return False
        resources.callback(target.remove)
        return True

    def announce_ready(self, now: float, paused: bool, subscriptions: list[str], concurrency: int, log: BoundLogger) -> None:
        """Ready to the probes, READY=1 to systemd, daemon.ready to the log: in that order, so that
        whoever saw READY=1 or the log line finds /readyz ready too, without waiting for a tick."""
        self.ready = True
        self.tick(now, "running", paused)
        self.notifier.ready(self.status_text("running"))
        log.info(
            "daemon.ready",
            subscription=subscriptions[0],
            **({"subscriptions": subscriptions} if len(subscriptions) > 1 else {}),
            concurrency=concurrency,
            systemd=self.notifier.enabled,
            watchdog_s=self.notifier.watchdog_interval,
        )

    def tick(self, now: float, state: str, paused: bool) -> None:
        """Every tick: the probes' snapshot (one small immutable object)."""
        self.metrics.publish_health(Health(now, state, self.ready, paused, self.pull_error()))

    def pull_error(self) -> str:
        """The last pull failure, of the first subscription whose pulls fail (each names its subscription
        when there are several): "" while every subscription pulls."""
        several = len(self.streams) > 1
        for stream in self.streams:
            if error := stream.io.puller.last_error:
                return f"{stream.name}: {error}" if several else error
        return ""

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
            held=sum(len(s.backlog) for s in self.streams),
            held_bytes=sum(s.backlog.held_bytes for s in self.streams),
            state=state,
        )
        for stream in self.streams:
            self.metrics.subscription_gauges(stream.name, running=stream.running(), held=len(stream.backlog))

    def status_text(self, state: str) -> str:
        c = self.streams.total(Counters())
        queued = sum(len(s.backlog) for s in self.streams)
        return (
            f"{state}: {self.pool.busy_count()} running, {queued} queued, "
            f"{c.succeeded} succeeded, {c.failed} failed, {self.pool.worker_count()} workers"
        )

    def status(self, now: float, state: str, concurrency: int, paused: bool) -> dict[str, Any]:
        """The `consumerd status` answer: plain data, JSON-ready; the totals first, then each subscription."""
        c = self.streams.total(Counters())
        each = [stream.status() for stream in self.streams]
        return {
            "state": state,
            "paused": paused,
            "uptime_s": round(now - self.started_at, 1),
            "concurrency": concurrency,
            "workers": self.pool.worker_count(),
            "running": [
                {
                    "worker_pid": job.pid,
                    "generation": job.generation,
                    "task": job.inflight.task,
                    "message_id": job.inflight.message.message_id,
                    "attempt": job.inflight.attempt,
                    "running_s": round(max(0.0, now - job.started_at), 3),
                    "rss_kb": _rss_kb(job.pid),
                }
                for job in self.pool.jobs()
            ],
            "generations": [  # which workers run which code: more than one while a reload's code loads or old tasks finish
                {"generation": g.number, "stage": g.stage.value, "workers": list(g.workers), "busy": g.busy, "age_s": round(g.age, 1)}
                for g in self.pool.generations(now)
            ],
            **{key: sum(s[key] for s in each) for key in ("queued", "dead_lettering", "publishing_outputs", "held_bytes")},
            "counters": dict(vars(c)),
            "pull_error": self.pull_error(),
            "subscriptions": each,
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

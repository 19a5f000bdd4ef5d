"""Runs one contender on one workload against the shared emulator, and measures it from outside."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.tasks import WORKLOADS
from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from harness.daemon import Daemon
from harness.procinfo import status_kb

REPO = Path(__file__).resolve().parents[1]
PROJECT = "bench"
RUN_LIMIT = 300.0  # seconds a single run may take before it is abandoned (reported as such)


@dataclasses.dataclass(frozen=True)
class Run:
    contender: str  # ceiling | subscribe | blog | consumerd
    workload: str
    n: int
    concurrency: int = 0  # consumerd only
    max_tasks_per_child: int = 0
    metrics: bool = True  # consumerd only: [metrics] listen on a free port, or "" (off)
    task: str = "bench"  # consumerd only: bench_async (async def), bench_batch (batch_size=500)
    async_concurrency: int = 100

    @property
    def label(self) -> str:
        if self.contender != "consumerd":
            return self.contender
        shape = {"bench_async": f" async={self.async_concurrency}", "bench_batch": " batch=500"}.get(self.task, "")
        return f"consumerd c={self.concurrency} mtpc={self.max_tasks_per_child}{shape}" + ("" if self.metrics else " metrics=off")


class Runner:
    def __init__(self, emulator_host: str) -> None:
        self.host = emulator_host
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=emulator_host))
        self.publisher = self.adapter.batch_publisher()
        self._serial = 0

    # -- one run -------------------------------------------------------------------------------
    def measure(self, run: Run) -> dict[str, Any]:
        topic, sub = self._fresh_subscription()
        try:
            self._publish_backlog(topic, run)
            out = Path(tempfile.mktemp(prefix="bench-", suffix=".txt"))
            if run.contender == "consumerd":
                ready_ts, usage = self._run_consumerd(sub, run, out)
            else:
                ready_ts, usage = self._run_contender(sub, run, out)
            return {"contender": run.label, "workload": run.workload, "n": run.n, **_from_ledger(out, run.n, ready_ts), **usage}
        finally:
            self._delete(topic, sub)

    def _fresh_subscription(self, ack_deadline: int = 60) -> tuple[str, str]:
        self._serial += 1
        return create_subscription(self.adapter, PROJECT, f"bench-{self._serial}", ack_deadline)

    def _publish_backlog(self, topic: str, run: Run) -> None:
        kinds = WORKLOADS[run.workload][0]
        futures = [self.publisher.publish(topic, b"x" * 100, kind=kinds[i % len(kinds)]) for i in range(run.n)]
        for future in futures:
            future.result(timeout=60)

    def _delete(self, topic: str, sub: str) -> None:
        # The emulator keeps acked messages until their topic and subscription are deleted.
        self.adapter.subscriber.delete_subscription(request={"subscription": sub})
        self.adapter.publisher.delete_topic(request={"topic": topic})

    def _env(self, out: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(PUBSUB_EMULATOR_HOST=self.host, GOOGLE_CLOUD_PROJECT=PROJECT, BENCH_OUT=str(out), PYTHONPATH=str(REPO))
        env.setdefault("CONSUMERD_METRICS__LISTEN", "127.0.0.1:0")
        return env

    def _run_contender(self, sub: str, run: Run, out: Path) -> tuple[float, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.contenders", run.contender, sub, str(run.n)],
            capture_output=True,
            text=True,
            env=self._env(out),
            cwd=REPO,
            timeout=RUN_LIMIT,
        )
        lines = proc.stdout.splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{run.label} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        ready_ts = float(next(line.split()[1] for line in lines if line.startswith("ready ")))
        usage = json.loads(lines[-1])
        rpcs = usage.pop("rpcs", {})
        usage["consumer_cpu_s_per_1k"] = round(usage.pop("consumer_cpu_s") * 1000 / run.n, 3)
        usage["rpcs_per_1k"] = {k: round(v * 1000 / run.n, 1) for k, v in rpcs.items() if isinstance(v, int)} or None
        return ready_ts, usage

    # -- consumerd -------------------------------------------------------------------------------
    def _run_consumerd(self, sub: str, run: Run, out: Path) -> tuple[float, dict[str, Any]]:
        env = self._env(out) | ({} if run.metrics else {"CONSUMERD_METRICS__LISTEN": ""})
        daemon = start_daemon(
            self._config(sub, run.concurrency, run.max_tasks_per_child, task=run.task, async_concurrency=run.async_concurrency), env
        )
        try:
            ready_ts = ready_at(daemon)
            cpu_at_ready = daemon.cpu_seconds()  # start-up (imports, connecting) is not per message
            _wait_for_lines(out, run.n, daemon)
            usage = daemon_usage(daemon)
            usage["consumer_cpu_s"] -= cpu_at_ready
        finally:
            stopped = daemon.stop()
        rpcs = stopped.get("rpcs", {}) if stopped else {}
        usage["consumer_cpu_s_per_1k"] = round(usage.pop("consumer_cpu_s") * 1000 / run.n, 3)
        usage["rpcs_per_1k"] = {k: round(v * 1000 / run.n, 1) for k, v in rpcs.items()}
        batches = Path(f"{out}.batches")
        if batches.exists():
            sizes = [int(line) for line in batches.read_text().split()]
            usage["batch_median"] = statistics.median(sizes)
            usage["batches"] = len(sizes)
        return ready_ts, usage

    def _config(
        self,
        sub: str,
        concurrency: int,
        mtpc: int,
        ack_deadline: int = 60,
        task: str = "bench",
        async_concurrency: int = 100,
        module: str = "bench.tasks",
    ) -> Path:
        path = Path(tempfile.mktemp(prefix="bench-", suffix=".toml"))
        path.write_text(
            f'[pubsub]\nsubscription = "{sub}"\n'
            f"[workers]\nconcurrency = {concurrency}\nmax_tasks_per_child = {mtpc}\nasync_concurrency = {async_concurrency}\n"
            f"[leases]\nack_deadline = {ack_deadline}\n"
            f'[tasks]\nmodules = ["{module}"]\ndefault = "{task}"\n[logging]\nformat = "json"\n'
        )
        return path

    def scaling(self, concurrencies: list[int], quick: bool) -> list[dict[str, Any]]:
        """Throughput of 100 ms sleep tasks as concurrency grows: the curve in the chart."""
        points = []
        for c in concurrencies:
            n = max(20, (10 if quick else 20) * c)
            record = self.measure(Run("consumerd", "io100", n, c, 0))
            points.append({"concurrency": c, "throughput": record["throughput"], "ideal": c / 0.1})
            print(f"  scaling c={c}: {record['throughput']:.1f} msg/s (ideal {c / 0.1:.0f})", flush=True)
        return points

    def idle_to_busy(self, cores: int) -> dict[str, Any]:
        """An idle daemon's CPU, then how soon single messages published to it start."""
        topic, sub = self._fresh_subscription()
        out = Path(tempfile.mktemp(prefix="bench-", suffix=".txt"))
        daemon = start_daemon(self._config(sub, cores, 0), self._env(out))
        try:
            daemon.wait_ready()
            time.sleep(2.0)
            cpu_before, idle_start = daemon.cpu_seconds(), time.monotonic()
            time.sleep(10.0)
            idle_cpu = (daemon.cpu_seconds() - cpu_before) / (time.monotonic() - idle_start) * 100
            for i in range(20):
                self.publisher.publish(topic, b"x", kind="noop").result(timeout=30)
                _wait_for_lines(out, i + 1, daemon)
                time.sleep(0.25)
        finally:
            daemon.stop()
            self._delete(topic, sub)
        latencies = sorted((end - pub) * 1000 for _, pub, end, _cpu in _read(out))
        result = {
            "start_latency_ms_p50": round(statistics.median(latencies), 1),
            "start_latency_ms_p99": round(latencies[-1], 1),
            "idle_cpu_percent": round(idle_cpu, 3),
        }
        print(f"  idle to busy: {result}", flush=True)
        return result

    def lease_renewals(self) -> dict[str, Any]:
        """64 tasks of 15 s on a 10 s ack deadline: modack RPCs against renewal ticks."""
        topic, sub = self._fresh_subscription(ack_deadline=10)
        out = Path(tempfile.mktemp(prefix="bench-", suffix=".txt"))
        for future in [self.publisher.publish(topic, b"x", kind="sleep15000") for _ in range(64)]:
            future.result(timeout=30)
        daemon = start_daemon(self._config(sub, 64, 0, ack_deadline=10), self._env(out))
        try:
            daemon.wait_ready()
            _wait_for_lines(out, 64, daemon)
        finally:
            stopped = daemon.stop()
            self._delete(topic, sub)
        ends = [end for _, _, end, _cpu in _read(out)]
        modacks = (stopped or {}).get("rpcs", {}).get("modack", 0)
        # Renewals fall due every 0.6 x 10 s while tasks run: one tick at ~6 s and one at ~12 s.
        ticks = int((max(ends) - min(ends) + 15) // 6)
        result = {"messages": 64, "task_seconds": 15, "ack_deadline": 10, "modack_rpcs": modacks, "renewal_ticks": ticks}
        print(f"  lease renewals: {result}", flush=True)
        return result

    def code_reload(self, concurrency: int, quick: bool) -> dict[str, Any]:
        """The cost of a reload: a backlog of 50-150 ms tasks keeps ``concurrency`` workers busy while
        the task module changes and SIGHUP brings the new code, twice. How soon the new code served,
        and the longest gap between two completions around each reload (the target: one task's length,
        100 ms on average), beside the longest before any reload."""
        n = 800 if quick else 2000
        topic, sub = self._fresh_subscription()
        out = Path(tempfile.mktemp(prefix="bench-", suffix=".txt"))
        code = Path(tempfile.mkdtemp(prefix="bench-reload-"))
        write_reload_module(code, 1)
        self._publish_backlog(topic, Run("consumerd", "io_mixed", n))
        env = self._env(out) | {"PYTHONPATH": f"{REPO}:{code}"}
        events = frozenset({"daemon.ready", "daemon.stopped", "code.ready"})
        daemon = Daemon(self._config(sub, concurrency, 0, module="bench_reload"), env, only=events).start()
        reloads = []
        try:
            daemon.wait_ready()
            for generation, share in ((2, 0.2), (3, 0.5)):  # a fifth of the backlog done, then half
                _wait_for_lines(out, int(n * share), daemon)
                write_reload_module(code, generation)
                mark, sent_at, sent = daemon.mark(), time.time(), time.monotonic()
                daemon.signal(signal.SIGHUP)
                [ready] = daemon.wait_for("code.ready", since=mark, timeout=60)
                reloads.append({"sent_at": sent_at, "ready_s": round(time.monotonic() - sent, 3), "fork_server_s": ready["took_s"]})
            _wait_for_lines(out, n, daemon)
        finally:
            stopped = daemon.stop()
            self._delete(topic, sub)
        ends = sorted(end for _, _, end, _cpu in _read(out))
        windows = [(r["sent_at"] - 1.0, r["sent_at"] + r["ready_s"] + 2.0) for r in reloads]
        result = {
            "messages": n,
            "concurrency": concurrency,
            "task_ms": 100,
            "reloads": [{k: v for k, v in r.items() if k != "sent_at"} for r in reloads],
            "longest_gap_ms": round(max(longest_gap(ends, lo, hi) for lo, hi in windows) * 1000, 1),
            "steady_longest_gap_ms": round(longest_gap(ends, ends[len(ends) // 10], windows[0][0]) * 1000, 1),  # before the first
            "nacked_unstarted": (stopped or {}).get("nacked_unstarted"),
            "duplicates": len(ends) - len({mid for mid, _, _, _ in _read(out)}),
        }
        print(f"  code reload: {result}", flush=True)
        return result


def write_reload_module(directory: Path, generation: int) -> None:
    """The task module of the reload scenario: the bench tasks, and a line that changes (its size too)."""
    text = f"import bench.tasks  # noqa: F401  (registers the bench tasks)\n\nGENERATION = {generation}  # {'x' * generation}\n"
    (directory / "bench_reload.py").write_text(text)


def longest_gap(ends: list[float], start: float, end: float) -> float:
    """The longest time between two consecutive completions (sorted ``ends``) from ``start`` to ``end``."""
    inside = [t for t in ends if start <= t <= end]
    return max((b - a for a, b in zip(inside, inside[1:])), default=0.0)


def create_subscription(adapter: PubSub, project: str, name: str, ack_deadline: int) -> tuple[str, str]:
    """A topic and a subscription to it, both called ``name``: what each run (or fleet scenario) starts from."""
    topic = f"projects/{project}/topics/{name}"
    sub = f"projects/{project}/subscriptions/{name}"
    adapter.ensure_topic(topic)
    adapter.ensure_subscription(topic, sub, ack_deadline)
    return topic, sub


def start_daemon(config: Path, env: dict[str, str]) -> Daemon:
    """The real `consumerd run`; only its ready and stopped events are parsed (no CPU on the rest)."""
    return Daemon(config, env, only=frozenset({"daemon.ready", "daemon.stopped"})).start()


def ready_at(daemon: Daemon, timeout: float = 60.0) -> float:
    return _epoch(daemon.wait_ready(timeout)["timestamp"])


def daemon_usage(daemon: Daemon) -> dict[str, Any]:
    workers = [_hwm_mb(pid) or 0.0 for pid in daemon.workers()]
    supervisor = _hwm_mb(daemon.pid)
    return {
        "consumer_cpu_s": daemon.cpu_seconds(),
        "consumer_rss_mb": supervisor,
        "worker_rss_mb": max(workers, default=None),
        "total_rss_mb": round((supervisor or 0.0) + sum(workers), 1),  # the supervisor and all its workers
    }


def _from_ledger(out: Path, n: int, ready_ts: float) -> dict[str, Any]:
    rows = _read(out)
    ids = [mid for mid, _, _, _ in rows]
    first_end = {}
    for mid, pub, end, _cpu in rows:
        first_end.setdefault(mid, (pub, end))
    cpu = [c for _, _, _, c in rows if c > 0]
    latencies = sorted((end - pub) * 1000 for pub, end in first_end.values())
    last = max(end for _, end in first_end.values())
    return {
        "throughput": round(len(first_end) / max(last - ready_ts, 1e-6), 2),
        "seconds": round(last - ready_ts, 3),
        "latency_ms": {"p50": round(_pct(latencies, 50), 1), "p99": round(_pct(latencies, 99), 1)},
        "duplicates": len(ids) - len(first_end),
        "task_cpu_ms": round(statistics.mean(cpu) * 1000, 3) if cpu else None,  # what a CPU task really cost
    }


def _read(out: Path) -> list[tuple[str, float, float, float]]:
    """(message id, published, ended, task CPU seconds) per ledger line."""
    rows = []
    for line in out.read_text().splitlines():
        mid, pub, end, _pid, *cpu = line.split()
        rows.append((mid, float(pub), float(end), float(cpu[0]) if cpu else 0.0))
    return rows


def _wait_for_lines(out: Path, n: int, daemon: Daemon) -> None:
    """Wait until ``n`` distinct messages are in the ledger. Reads only what was appended since the
    last look, 20 times a second, so the harness takes next to no CPU from the daemon it measures
    (the other contenders are not polled at all: the harness waits for them to exit)."""
    deadline = time.monotonic() + RUN_LIMIT
    seen: set[str] = set()
    offset = 0
    while time.monotonic() < deadline:
        if out.exists():
            with out.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            seen.update(line.split(b" ", 1)[0] for line in complete.splitlines())
            if len(seen) >= n:
                return
        if not daemon.alive():
            raise RuntimeError("consumerd exited during the run")
        time.sleep(0.05)
    raise RuntimeError(f"consumerd did not finish {n} messages in {RUN_LIMIT:.0f}s")


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _hwm_mb(pid: int) -> float | None:
    kb = status_kb(pid, "VmHWM")
    return round(kb / 1024, 1) if kb is not None else None

"""Several subscriptions in one daemon, sharing one worker pool: what `python -m bench` measures of it.

- **single**: one subscription flooded with CPU-bound 20 ms tasks at concurrency = cores, the
  figure the fair share is compared with.
- **fair share**: the same flood on one subscription while a second, quiet one (weight 1 each)
  receives a message every so often over the flood's length: the quiet one's publish-to-done
  latency, and the total throughput against the single subscription's.
- **weights**: two subscriptions flooded, weights 3:1: completions of each while both still have a
  backlog.
- **memory**: five subscriptions in one daemon at concurrency 10 against five one-subscription
  daemons at concurrency 2 each: the PSS of every process of each (supervisors, fork servers,
  workers), once all are ready and have run some messages.

Every figure comes from the bench tasks' own ledger (`bench.tasks.record`): publish time and end
time per message, whichever daemon ran it; which subscription a message came from is known from
the ids its publish returned.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from bench.runner import PROJECT, RUN_LIMIT, ready_at, start_daemon
from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.testing.live import to_toml
from harness.daemon import Daemon, daemon_env
from harness.procinfo import descendants, workers_of

TASK_MODULES = ["bench.tasks"]
QUIET_SPREAD = 0.9  # the quiet messages are published over this share of the flood's expected length


@dataclasses.dataclass(frozen=True)
class Sizes:
    flood: int  # CPU 20 ms messages on the flooded subscription (and on the single one)
    quiet: int  # messages to the quiet subscription, spread over the flood
    weighted: int  # CPU 20 ms messages on the weight-3 subscription (half as many on the weight-1 one)
    warm: int  # messages per subscription before the memory is measured (100 ms sleeps)
    limited: int  # messages of the rate-limited task (bench/ratelimit.py)


FULL = Sizes(flood=5000, quiet=100, weighted=2000, warm=20, limited=1000)
QUICK = Sizes(flood=600, quiet=30, weighted=300, warm=20, limited=400)


class Row(NamedTuple):
    published: float  # the message's publish_time, epoch seconds
    ended: float  # when its task ended, epoch seconds
    cpu_s: float  # the CPU its task spent (0 for sleeps and no-ops)


class Ledger:
    """The lines the bench tasks append to one BENCH_OUT file, read as they come: message id -> its
    first finish (a duplicate finishes again; it is counted in ``duplicates``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, Row] = {}
        self.duplicates = 0
        self._offset = 0

    def read(self) -> dict[str, Row]:
        """What was appended since the last read, added; only whole lines."""
        if self.path.exists():
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.decode().splitlines():
                mid, published, ended, _pid, *cpu = line.split()
                if mid in self.rows:
                    self.duplicates += 1
                else:
                    self.rows[mid] = Row(float(published), float(ended), float(cpu[0]) if cpu else 0.0)
        return self.rows

    def wait(self, ids: Iterable[str], daemons: list[Daemon], count: int = 0, timeout: float = RUN_LIMIT) -> dict[str, Row]:
        """Until every one of ``ids`` finished (or ``count`` of them), 20 looks a second (next to no
        CPU taken from the daemons)."""
        wanted = set(ids)
        enough = count or len(wanted)
        deadline = time.monotonic() + timeout
        while len(wanted & self.read().keys()) < enough:
            if not all(d.alive() for d in daemons):
                raise RuntimeError("consumerd exited during the run")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(wanted - self.rows.keys())} of {len(wanted)} messages not done in {timeout:.0f}s")
            time.sleep(0.05)
        return self.rows


class Scenarios:
    """Daemons started on subscriptions of the bench's emulator, each scenario on fresh ones."""

    def __init__(self, emulator_host: str, cores: int, quick: bool) -> None:
        self.host = emulator_host
        self.cores = cores
        self.sizes = QUICK if quick else FULL
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=emulator_host))
        self.publisher = self.adapter.batch_publisher()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-subscriptions-"))
        self._serial = 0
        self._made: list[tuple[str, str]] = []

    # -- the pieces ----------------------------------------------------------------------------
    def subscription(self) -> tuple[str, str]:
        """A fresh topic and its subscription (deleted by `cleanup`)."""
        self._serial += 1
        name = f"subs-{self._serial}"
        topic, sub = f"projects/{PROJECT}/topics/{name}", f"projects/{PROJECT}/subscriptions/{name}"
        self.adapter.ensure_topic(topic)
        self.adapter.ensure_subscription(topic, sub, 60)
        self._made.append((topic, sub))
        return topic, sub

    def cleanup(self) -> None:
        """The emulator keeps acked messages until their topic and subscription are deleted."""
        for topic, sub in self._made:
            self.adapter.subscriber.delete_subscription(request={"subscription": sub})
            self.adapter.publisher.delete_topic(request={"topic": topic})
        self._made.clear()

    def publish(self, topic: str, kinds: list[str], tasks: list[str] | None = None) -> list[str]:
        """One message per kind, in order; their ids. ``tasks[i]`` routes message i (else, or if
        empty, tasks.default: the bench task)."""
        routes = [{"task": name} if name else {} for name in tasks] if tasks else [{}] * len(kinds)
        futures = [self.publisher.publish(topic, b"x" * 100, kind=kind, **route) for kind, route in zip(kinds, routes, strict=True)]
        return [future.result(timeout=60) for future in futures]

    def ledger(self, name: str) -> Ledger:
        return Ledger(self.dir / f"{name}.txt")

    def start(self, subscriptions: str | list[dict[str, Any]], concurrency: int, ledger: Ledger, **tasks: Any) -> Daemon:
        """`consumerd run` on one subscription (a name) or several ([[subscriptions]] entries)."""
        settings: dict[str, Any] = {
            "workers": {"concurrency": concurrency, "max_tasks_per_child": 0},
            "leases": {"ack_deadline": 60},
            "tasks": {"modules": TASK_MODULES, "default": "bench", **tasks},
            "logging": {"format": "json"},
        }
        if isinstance(subscriptions, str):
            settings["pubsub"] = {"subscription": subscriptions}
        else:
            settings["subscriptions"] = subscriptions
        self._serial += 1
        config = self.dir / f"config-{self._serial}.toml"
        config.write_text(to_toml(settings))
        env = daemon_env(self.host, self.dir, GOOGLE_CLOUD_PROJECT=PROJECT, BENCH_OUT=str(ledger.path))
        return start_daemon(config, env)

    # -- the scenarios -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every scenario of this module, in order: single first (the others are compared with it)."""
        single = self.single()
        return {"single": single, "fair_share": self.fair_share(single), "weights": self.weights(), "memory": self.memory()}

    def single(self) -> dict[str, Any]:
        """The flood alone on one subscription: throughput from ready to the last done, and steady
        (from the first done to the last)."""
        n = self.sizes.flood
        topic, sub = self.subscription()
        ids = self.publish(topic, ["cpu20"] * n)
        ledger = self.ledger("single")
        daemon = self.start(sub, self.cores, ledger)
        try:
            ready, cpu, use = ready_at(daemon), daemon.cpu_seconds(), CpuUse([daemon.pid])
            rows = ledger.wait(ids, [daemon])
            cpu, cores = daemon.cpu_seconds() - cpu, use.cores()
        finally:
            daemon.stop()
            self.cleanup()
        ends = sorted(rows[m].ended for m in ids)
        result = {
            "messages": n,
            "concurrency": self.cores,
            "throughput": round(n / (ends[-1] - ready), 2),
            "steady_throughput": round(steady_rate(ends, skip=0), 2),
            "task_cpu_ms": round(statistics.mean(rows[m].cpu_s for m in ids) * 1000, 3),
            "supervisor_cpu_s_per_1k": round(cpu * 1000 / n, 3),  # from ready: start-up is not per message
            **cores,
        }
        print(f"  one subscription, {n} x CPU 20 ms at c={self.cores}: {result}", flush=True)
        return result

    def fair_share(self, single: dict[str, Any]) -> dict[str, Any]:
        """The flood on one subscription, and a quiet one receiving a message every so often over
        the time the flood took alone, from when its first message is done (the flood is running:
        a quiet message that came before would have had the workers to itself); weight 1 each."""
        n, quiet = self.sizes.flood, self.sizes.quiet
        (flood_topic, flood_sub), (quiet_topic, quiet_sub) = self.subscription(), self.subscription()
        flood_ids = self.publish(flood_topic, ["cpu20"] * n)
        ledger = self.ledger("fair-share")
        daemon = self.start([{"name": flood_sub, "weight": 1}, {"name": quiet_sub, "weight": 1}], self.cores, ledger)
        try:
            ready, cpu, use = ready_at(daemon), daemon.cpu_seconds(), CpuUse([daemon.pid])
            ledger.wait(flood_ids, [daemon], count=1)
            started, interval = time.time(), QUIET_SPREAD * n / single["throughput"] / quiet
            quiet_ids = []
            for i in range(quiet):
                time.sleep(max(0.0, started + i * interval - time.time()))
                quiet_ids += self.publish(quiet_topic, ["cpu20"])
            rows = ledger.wait(flood_ids + quiet_ids, [daemon])
            cpu, cores = daemon.cpu_seconds() - cpu, use.cores()
        finally:
            daemon.stop()
            self.cleanup()
        flood_end = max(rows[m].ended for m in flood_ids)
        quiet_rows = [rows[m] for m in quiet_ids]
        during = sum(1 for r in quiet_rows if r.ended <= flood_end)
        quiet_ms = sorted((r.ended - r.published) * 1000 for r in quiet_rows)
        flood_ms = sorted((rows[m].ended - rows[m].published) * 1000 for m in flood_ids)
        result = {
            "flood": n,
            "quiet": quiet,
            "concurrency": self.cores,
            "quiet_done_during_flood": during,
            "quiet_latency_ms": {"p50": round(percentile(quiet_ms, 50), 1), "p99": round(percentile(quiet_ms, 99), 1)},
            "flood_latency_ms": {"p50": round(percentile(flood_ms, 50), 1), "p99": round(percentile(flood_ms, 99), 1)},
            "throughput": round((n + during) / (flood_end - ready), 2),  # both subscriptions, until the flood is done
            "single_throughput": single["throughput"],
            "supervisor_cpu_s_per_1k": round(cpu * 1000 / (n + quiet), 3),
            **cores,
            "duplicates": ledger.duplicates,
        }
        print(f"  fair share, flooded + quiet: {result}", flush=True)
        return result

    def weights(self) -> dict[str, Any]:
        """Two flooded subscriptions, weights 3:1; the weight-1 one has more than it can finish
        meanwhile, and the run stops once the weight-3 one is done."""
        n = self.sizes.weighted
        (heavy_topic, heavy_sub), (light_topic, light_sub) = self.subscription(), self.subscription()
        heavy = self.publish(heavy_topic, ["cpu20"] * n)
        light = self.publish(light_topic, ["cpu20"] * (n // 2))
        ledger = self.ledger("weights")
        daemon = self.start([{"name": heavy_sub, "weight": 3}, {"name": light_sub, "weight": 1}], self.cores, ledger)
        try:
            ready_at(daemon)
            ledger.wait(heavy, [daemon])
        finally:
            daemon.stop()
            self.cleanup()
        done = completions_while_backlogged(ledger.read(), [heavy, light])
        result = {"weights": [3, 1], "messages": [n, n // 2], "concurrency": self.cores, "done": done}
        print(f"  weights 3:1, both flooded: {result}", flush=True)
        return result

    def memory(self) -> dict[str, Any]:
        """Five subscriptions in one daemon at concurrency 10, then five daemons at 2 each (all at
        once): each set's processes, once they ran ``warm`` 100 ms sleeps per subscription. Each
        set on subscriptions of its own: the emulator hands new messages to a pull left open by a
        daemon that stopped, and they would wait out their ack deadline."""
        one_daemon = self._warmed("memory-one", lambda pairs, ledger: [self.start([{"name": sub} for _, sub in pairs], 10, ledger)])
        five_daemons = self._warmed("memory-five", lambda pairs, ledger: [self.start(sub, 2, ledger) for _, sub in pairs])
        result = {
            "one_daemon": one_daemon,
            "five_daemons": five_daemons,
            "share_percent": round(one_daemon["pss_mb"] / five_daemons["pss_mb"] * 100, 1),
        }
        print(f"  memory, 5 subscriptions in 1 daemon (c=10) vs 5 daemons (c=2): {result}", flush=True)
        return result

    def _warmed(self, name: str, start: Callable[[list[tuple[str, str]], Ledger], list[Daemon]]) -> dict[str, Any]:
        """The memory of the daemons ``start`` runs on five fresh subscriptions, once they are
        ready and have run ``warm`` messages each; then they are stopped (all at once)."""
        pairs = [self.subscription() for _ in range(5)]
        ids = [m for topic, _ in pairs for m in self.publish(topic, ["sleep100"] * self.sizes.warm)]
        ledger = self.ledger(name)
        daemons = start(pairs, ledger)
        try:
            for daemon in daemons:
                daemon.wait_ready()
            ledger.wait(ids, daemons)
            time.sleep(0.5)  # the last results are settled and acked; nothing is starting
            return process_memory([d.pid for d in daemons])
        finally:
            with concurrent.futures.ThreadPoolExecutor(len(daemons)) as stopping:
                list(stopping.map(Daemon.stop, daemons))
            self.cleanup()


# -- pure: figures from ledger rows -------------------------------------------------------------
def steady_rate(times: list[float], skip: int) -> float:
    """Messages per second from sorted ``times``, after the first ``skip`` of them."""
    steady = times[skip:]
    return (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 and steady[-1] > steady[0] else 0.0


def completions_while_backlogged(rows: dict[str, Row], groups: list[list[str]]) -> list[int]:
    """How many of each group of ids (one group per subscription) finished before the first group
    whose every message finished did (its backlog ran dry then; until then all had one)."""
    finished = [max(rows[m].ended for m in ids) for ids in groups if ids and all(m in rows for m in ids)]
    until = min(finished, default=float("inf"))
    return [sum(1 for m in ids if m in rows and rows[m].ended <= until) for ids in groups]


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted ``values`` (the bench's convention: the value at index n*p/100)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# -- process CPU and memory ---------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


class CpuUse:
    """From now on: how many cores the machine kept busy, and how many of them the daemons' processes
    (each supervisor and all below it). On a shared machine the gap is what others took: a run whose
    daemon got fewer cores than the run it is compared with measured the machine, not the daemon."""

    def __init__(self, supervisors: list[int]) -> None:
        self.supervisors = supervisors
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        daemons = [p for pid in self.supervisors for p in [pid, *(child for child, _ in descendants(pid))]]
        return time.monotonic(), machine_busy_seconds(), sum(process_cpu_seconds(p) for p in daemons)

    def cores(self) -> dict[str, float]:
        (wall0, busy0, daemon0), (wall, busy, daemon) = self.start, self._sample()
        return {
            "daemon_cores": round((daemon - daemon0) / (wall - wall0), 2),
            "machine_busy_cores": round((busy - busy0) / (wall - wall0), 2),
        }


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    user, nice, system, idle, iowait, *rest = (int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:])
    return (user + nice + system + sum(rest[:3])) / TICK  # irq, softirq, steal; not idle or iowait


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU seconds, its reaped children's included (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / TICK  # utime, stime, cutime, cstime


# -- process memory -------------------------------------------------------------------------------
def pss_kb(pid: int) -> int:
    """A process's proportional set size (its pages, shared ones divided among their sharers), in
    kB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def process_memory(supervisors: list[int]) -> dict[str, Any]:
    """The PSS of these daemons and all their descendants, read at one moment: in total, and by
    role (supervisors; workers; the rest, i.e. fork servers)."""
    workers = [w for pid in supervisors for w in workers_of(pid)]
    others = [p for pid in supervisors for p, _ in descendants(pid) if p not in workers]
    kb = {pid: pss_kb(pid) for pid in [*supervisors, *workers, *others]}

    def mb(pids: Iterable[int]) -> float:
        return round(sum(kb[p] for p in pids) / 1024, 1)

    return {
        "pss_mb": mb(kb),
        "supervisors_mb": mb(supervisors),
        "fork_servers_mb": mb(others),
        "workers_mb": mb(workers),
        "processes": len(kb),
        "workers": len(workers),
    }


def lines(result: dict[str, Any]) -> list[str]:
    """The scenarios' figures, for the bench's printed summary."""
    single, fair, weights, memory = result["single"], result["fair_share"], result["weights"], result["memory"]
    one, five = memory["one_daemon"], memory["five_daemons"]
    heavy, light = weights["done"]
    return [
        f"subscriptions (c={single['concurrency']}, CPU 20 ms): one alone {single['throughput']:.1f} msg/s; "
        f"flooded ({fair['flood']}) + quiet ({fair['quiet']}), weight 1 each: {fair['throughput']:.1f} msg/s, "
        f"quiet p50 {fair['quiet_latency_ms']['p50']:.0f} ms p99 {fair['quiet_latency_ms']['p99']:.0f} ms",
        f"  supervisor CPU s per 1k messages {single['supervisor_cpu_s_per_1k']:.2f} alone, {fair['supervisor_cpu_s_per_1k']:.2f} shared; "
        f"cores the daemon got {single['daemon_cores']:.2f} alone, {fair['daemon_cores']:.2f} shared "
        f"(machine busy {single['machine_busy_cores']:.2f}, {fair['machine_busy_cores']:.2f})",
        f"weights 3:1, both flooded: {heavy}:{light} completed while both had a backlog" + (f" ({heavy / light:.2f}:1)" if light else ""),
        "memory, PSS MB           total  supervisors  fork servers  workers  processes",
        *(
            f"  {label:<22} {m['pss_mb']:>7.1f} {m['supervisors_mb']:>12.1f} {m['fork_servers_mb']:>13.1f} {m['workers_mb']:>8.1f}"
            f" {m['processes']:>10}"
            for label, m in (("1 daemon, 5 subs c=10", one), ("5 daemons, c=2 each", five))
        ),
        f"  one daemon: {memory['share_percent']:.1f} % of five",
    ]

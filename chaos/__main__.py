"""The chaos soak: `python -m chaos [--messages N]` (`make chaos`: 20,000; `make test`: 1,000).

Against the real emulator: publish N messages whose tasks misbehave at random (see chaos/tasks.py),
run the real daemon, and meanwhile SIGTERM and restart it twice, SIGKILL it once (its orphaned
workers must die with it), freeze the emulator past the ack deadline, and run a second daemon on
the same subscription for a while. Then compare the ledger the tasks wrote with what was
published and print the table. Exit 1 if anything was lost or an invariant broke.

A second scenario stops and restarts the emulator under the daemon (the emulator keeps nothing, so
this one checks survival and recovery, not the ledger).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from chaos.tasks import FATES_OF, SHAPES
from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.testing.emulator import Emulator
from harness.daemon import Daemon
from harness.procinfo import alive

REPO = Path(__file__).resolve().parents[1]
PROJECT = "chaos"
ACK_DEADLINE = 10
SLOW_SECONDS = ACK_DEADLINE + 2  # a "slow" task outlives its first lease: renewals must keep it
TASK_TIMEOUT = SLOW_SECONDS + 2  # ...while a "hang" is killed


class Soak:
    def __init__(self, messages: int, seed: int, workdir: Path) -> None:
        self.n = messages
        self.rng = random.Random(seed)
        self.dir = workdir
        self.shapes: dict[str, str] = {}  # message id -> the task it was sent to
        self.ledger = workdir / "ledger.txt"
        self.log = workdir / "daemon.log"
        self.events: list[tuple[float, str]] = []  # (time, what) for the duplicate causes
        self.restarts = 0
        self.orphans_left = 0
        self.peak_rss_mb = 0.0

    def run(self) -> dict:
        with Emulator(java_heap="2g") as emulator:
            self.emulator = emulator
            self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=emulator.host))
            topic, sub, dl_topic, dl_sub = self.setup()
            fates = self.publish(topic)
            config = self.write_config(sub, dl_topic)
            self.drive(config)
            dead_lettered = self.read_dead_letters(dl_sub)
            result = self.tally(fates, dead_lettered)
            result["emulator_restart"] = self.emulator_restart_scenario(config, topic, sub)
        return result

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> tuple[str, str, str, str]:
        names = [f"projects/{PROJECT}/topics/{t}" for t in ("jobs", "jobs-dead")]
        subs = [f"projects/{PROJECT}/subscriptions/{s}" for s in ("jobs", "jobs-dead")]
        for topic, sub in zip(names, subs):
            self.adapter.ensure_topic(topic)
            self.adapter.ensure_subscription(topic, sub, ACK_DEADLINE)
        return names[0], subs[0], names[1], subs[1]

    def publish(self, topic: str) -> dict[str, str]:
        publisher = self.adapter.batch_publisher()
        shapes = self.rng.choices(list(SHAPES), list(SHAPES.values()), k=self.n)
        chosen = [(shape, self.rng.choices(list(FATES_OF[shape]), list(FATES_OF[shape].values()))[0]) for shape in shapes]
        futures = [
            (shape, fate, publisher.publish(topic, f"payload {i}".encode(), fate=fate, task=shape))
            for i, (shape, fate) in enumerate(chosen)
        ]
        fates = {}
        for shape, fate, future in futures:
            mid = future.result(timeout=60)
            fates[mid] = fate
            self.shapes[mid] = shape
        publisher.stop()
        return fates

    def write_config(self, sub: str, dl_topic: str) -> Path:
        config = self.dir / "consumerd.toml"
        config.write_text(
            f'[pubsub]\nsubscription = "{sub}"\n'
            f"[workers]\nconcurrency = 8\nasync_concurrency = 20\ntask_timeout = {TASK_TIMEOUT}\n"
            f"[leases]\nack_deadline = {ACK_DEADLINE}\n"
            "[retry]\nmin_backoff = 0.5\nmax_backoff = 2\n"
            f'[dead_letter]\ntopic = "{dl_topic}"\nmax_attempts = 20\n'
            "[shutdown]\ndrain_timeout = 15\n"
            '[tasks]\nmodules = ["chaos.tasks"]\ndefault = "chaos"\n[logging]\nformat = "json"\n'
        )
        return config

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(
            PUBSUB_EMULATOR_HOST=self.emulator.host,
            GOOGLE_CLOUD_PROJECT=PROJECT,
            PYTHONPATH=str(REPO),
            CONSUMERD_METRICS__LISTEN="127.0.0.1:0",  # two daemons run at once in the soak
            CHAOS_LEDGER=str(self.ledger),
            CHAOS_SLOW_SECONDS=str(SLOW_SECONDS),
        )
        return env

    # -- the faults ----------------------------------------------------------------------------
    def drive(self, config: Path) -> None:
        daemon = self.start(config)
        plan = [
            (0.15, "sigterm"),
            (0.30, "sigkill"),
            (0.45, "freeze"),
            (0.60, "sigterm"),
            (0.75, "second_daemon"),
        ]
        for fraction, fault in plan:
            self.wait_progress(fraction, daemon)
            daemon = getattr(self, f"fault_{fault}")(daemon, config)
        self.wait_progress(1.0, daemon, everything=True)
        self.note("final stop")
        code = terminate(daemon)
        self.peak_rss_mb = max(self.peak_rss_mb, daemon.peak_rss_mb)
        if code != 0:
            raise RuntimeError(f"final SIGTERM: exit {code}")

    def start(self, config: Path) -> Daemon:
        daemon = Daemon(config, self.env(), log=self.log, only=frozenset({"daemon.ready"})).start()
        daemon.wait_ready()
        self.note("daemon started")
        return daemon

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))
        print(f"  [{time.strftime('%H:%M:%S')}] {what}: {self.settled()} of {self.n} settled", flush=True)

    def fault_sigterm(self, daemon: Daemon, config: Path) -> Daemon:
        self.note("SIGTERM")
        code = terminate(daemon)
        self.peak_rss_mb = max(self.peak_rss_mb, daemon.peak_rss_mb)
        if code != 0:
            raise RuntimeError(f"SIGTERM drain ended with exit {code}")
        self.restarts += 1
        return self.start(config)

    def fault_sigkill(self, daemon: Daemon, config: Path) -> Daemon:
        workers = daemon.workers()
        self.note(f"SIGKILL supervisor ({len(workers)} workers)")
        daemon.kill()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.orphans_left = sum(alive(pid) for pid in workers)
        self.restarts += 1
        return self.start(config)

    def fault_freeze(self, daemon: Daemon, config: Path) -> Daemon:
        self.note("emulator frozen (SIGSTOP)")
        self.emulator.signal(signal.SIGSTOP)
        time.sleep(ACK_DEADLINE + 3)  # the fault: longer than the ack deadline
        self.emulator.signal(signal.SIGCONT)
        self.note("emulator resumed")
        return daemon

    def fault_second_daemon(self, daemon: Daemon, config: Path) -> Daemon:
        self.note("second daemon on the same subscription")
        second = self.start(config)
        time.sleep(10)
        terminate(second)
        self.note("second daemon stopped")
        return daemon

    # -- progress and results ----------------------------------------------------------------
    def lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.ledger.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def settled(self) -> int:
        return len({parts[0] for parts in self.lines() if parts[3] in ("success", "reject")})

    def wait_progress(self, fraction: float, daemon: Daemon, everything: bool = False, timeout: float = 900) -> None:
        target = self.n if everything else int(self.n * fraction)
        deadline = time.monotonic() + timeout
        while self.settled() < target:
            daemon.sample_rss()
            if daemon.process.poll() is not None:
                raise RuntimeError(f"daemon died unexpectedly with {daemon.process.returncode}")
            if time.monotonic() > deadline:
                print(f"  timed out at {self.settled()} of {target}", flush=True)
                return
            time.sleep(0.2)

    def read_dead_letters(self, dl_sub: str) -> set[str]:
        found: set[str] = set()
        while batch := _pull(self.adapter, dl_sub):
            found |= batch
        return found

    def tally(self, fates: dict[str, str], dead_lettered: set[str]) -> dict:
        lines = self.lines()
        successes = Counter(parts[0] for parts in lines if parts[3] == "success")
        rejected = {mid for mid, fate in fates.items() if fate == "reject"}
        lost = sorted(mid for mid in fates if mid not in rejected and successes[mid] == 0)
        duplicates = {mid: n for mid, n in successes.items() if n > 1}
        deaths = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            if '"worker.exited"' in line:
                event = json.loads(line)
                if event.get("level") == "warning":
                    deaths[_death_cause(event)] += 1
        return {
            "published": len(fates),
            "succeeded": len(successes),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "duplicates": len(duplicates),
            "duplicate_causes": self.duplicate_causes(duplicates, fates, lines),
            "rejected_by_tasks": len(rejected),
            "dead_lettered": len(dead_lettered),
            "dead_letter_matches_rejects": dead_lettered == rejected,
            "worker_deaths": dict(deaths),
            "daemon_restarts": self.restarts,
            "orphaned_workers_left_after_sigkill": self.orphans_left,
            "peak_supervisor_rss_mb": round(self.peak_rss_mb, 1),
            "fates": dict(Counter(fates.values())),
            "shapes": {shape: dict(Counter(f for mid, f in fates.items() if self.shapes[mid] == shape)) for shape in SHAPES},
        }

    def duplicate_causes(self, duplicates: dict[str, int], fates: dict[str, str], lines: list[list[str]]) -> dict[str, int]:
        """Why a message succeeded twice, judged by when its first success was, against the faults."""
        first_success: dict[str, float] = {}
        for parts in lines:
            if parts[3] == "success":
                first_success.setdefault(parts[0], float(parts[4]))
        windows = self.fault_windows()
        causes: Counter[str] = Counter()
        for mid in duplicates:
            at = first_success[mid]
            cause = next((name for name, start, end in windows if start <= at <= end), None)
            if cause is None:
                cause = "slow task outlived a lease" if fates[mid] == "slow" else "other"
            causes[cause] += 1
        return dict(causes)

    def fault_windows(self) -> list[tuple[str, float, float]]:
        """(cause, from, to): a success in the window may not have been acked because of the fault."""
        windows = []
        events = dict((what.split(" (")[0], at) for at, what in self.events)
        for at, what in self.events:
            if what.startswith("SIGKILL"):
                windows.append(("supervisor SIGKILLed after success, before the ack", at - 1.0, at))
            elif what.startswith("emulator frozen"):
                end = events.get("emulator resumed", at)
                windows.append(("emulator frozen: acks failed until the lease ran out", at - 1.0, end))
            elif what.startswith("second daemon on"):
                windows.append(("two daemons on the subscription", at, events.get("second daemon stopped", at)))
            elif what == "SIGTERM":
                windows.append(("SIGTERM drain", at - 1.0, at + 1.0))
        return windows

    def emulator_restart_scenario(self, config: Path, topic: str, sub: str) -> dict:
        """Stop and restart the emulator under a running daemon: it must survive and resume."""
        daemon = self.start(config)
        self.emulator.stop()
        self.note("emulator stopped")
        time.sleep(3)
        self.emulator.start()
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=self.emulator.host))
        self.adapter.ensure_topic(topic)
        self.adapter.ensure_subscription(topic, sub, ACK_DEADLINE)
        mark = len(self.lines())  # the new emulator numbers message ids from 1 again
        publisher = self.adapter.batch_publisher()
        ids = {f.result(timeout=60) for f in [publisher.publish(topic, b"after restart", fate="ok") for _ in range(50)]}
        publisher.stop()
        deadline = time.monotonic() + 120
        resumed: set[str] = set()
        while len(resumed) < len(ids) and time.monotonic() < deadline:
            resumed = {p[0] for p in self.lines()[mark:] if p[3] == "success" and p[0] in ids}
            time.sleep(0.2)
        survived = daemon.process.poll() is None
        code = terminate(daemon)
        self.note("emulator restart scenario done")
        return {"survived": survived, "published": len(ids), "resumed": len(resumed), "exit_code": code}


def _pull(adapter: PubSub, sub: str) -> set[str]:
    from google.api_core import exceptions as gexc

    try:
        response = adapter.subscriber.pull(request={"subscription": sub, "max_messages": 100}, timeout=5, retry=None)
    except gexc.DeadlineExceeded:
        return set()
    received = response.received_messages
    if received:
        adapter.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [m.ack_id for m in received]})
    return {m.message.attributes["consumerd_original_message_id"] for m in received}


def terminate(daemon: Daemon) -> int:
    """SIGTERM (a drain) and the exit code; the chaos soak's drains may take up to two minutes."""
    daemon.sample_rss()
    daemon.stop(timeout=120)
    assert daemon.process is not None
    return daemon.process.returncode


def _death_cause(event: dict) -> str:
    """From the typed fields of a worker.exited event: why we killed it, else its exit code or signal."""
    if event.get("kill_reason") == "timeout":
        return "timeout (killed)"
    code = event.get("exit_code")
    if isinstance(code, int) and code < 0:
        return {-signal.SIGKILL: "SIGKILL", -signal.SIGSEGV: "segfault"}.get(code, f"signal {-code}")
    if isinstance(code, int):
        return f"exited with code {code}"
    return "other"


def print_table(r: dict) -> None:
    rows = [
        ("published", r["published"]),
        ("succeeded (unique)", r["succeeded"]),
        ("LOST (published, not rejected, never succeeded)", r["lost"]),
        ("succeeded more than once", f"{r['duplicates']} {r['duplicate_causes']}"),
        (
            "rejected by tasks / dead-lettered",
            f"{r['rejected_by_tasks']} / {r['dead_lettered']} (match: {r['dead_letter_matches_rejects']})",
        ),
        ("worker deaths by cause", r["worker_deaths"]),
        ("daemon restarts", r["daemon_restarts"]),
        ("orphaned workers left after SIGKILL", r["orphaned_workers_left_after_sigkill"]),
        ("peak supervisor RSS (MB)", r["peak_supervisor_rss_mb"]),
        ("emulator stop/restart: survived and resumed", r["emulator_restart"]),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="consumerd-chaos-"))
    print(f"chaos soak: {args.messages} messages, seed {args.seed}, files in {workdir}", flush=True)
    result = Soak(args.messages, args.seed, workdir).run()
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    broken = (
        result["lost"] > 0
        or not result["dead_letter_matches_rejects"]
        or result["orphaned_workers_left_after_sigkill"] > 0
        or not result["emulator_restart"]["survived"]
        or result["emulator_restart"]["resumed"] != result["emulator_restart"]["published"]
        or result["emulator_restart"]["exit_code"] != 0
    )
    print("\nFAILED: an invariant broke" if broken else "\nOK: nothing lost, every invariant held")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

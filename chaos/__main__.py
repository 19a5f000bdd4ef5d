"""The chaos soak: `python -m chaos [--messages N] [--subscriptions K]` (`make chaos`: 20,000;
`make test`: 1,000; both across two subscriptions).

Against the real emulator: publish N messages whose tasks misbehave at random (see chaos/tasks.py),
split between K topics by the weights of their subscriptions, which one daemon serves with one
worker pool ([[subscriptions]]; each but the first with a dead-letter topic of its own). Meanwhile
SIGTERM and restart the daemon twice, SIGKILL it once (its orphaned workers must die with it),
freeze the emulator past the ack deadline, and run a second daemon on the same subscriptions for a
while. Then compare the ledger the tasks wrote with what was published, subscription by
subscription (chaos/tally.py), and print the table. Exit 1 if anything was lost, ran in a
subscription it was not published to, or an invariant broke.

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
from typing import Any

from chaos import tally
from chaos.feeds import PROJECT, feeds, split
from chaos.ledger import Key, Mark, Reader
from chaos.tally import DeadLetter, Published, Timeline, Window
from chaos.tasks import FATES_OF, SHAPES
from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.testing.emulator import Emulator
from consumerd.testing.live import to_toml
from harness.daemon import Daemon
from harness.procinfo import alive

REPO = Path(__file__).resolve().parents[1]
ACK_DEADLINE = 10
SLOW_SECONDS = ACK_DEADLINE + 2  # a "slow" task outlives its first lease: renewals must keep it
TASK_TIMEOUT = SLOW_SECONDS + 2  # ...while a "hang" is killed


class Soak:
    def __init__(self, messages: int, seed: int, workdir: Path, subscriptions: int = 2) -> None:
        self.n = messages
        self.rng = random.Random(seed)
        self.dir = workdir
        self.feeds = feeds(subscriptions)
        self.ledger = Reader(workdir / "ledger.txt")
        self.log = workdir / "daemon.log"
        self.events: list[tuple[float, str]] = []  # (time, what) for the duplicate causes
        self.restarts = 0
        self.orphans_left = 0
        self.peak_rss_mb = 0.0

    def run(self) -> dict:
        with Emulator(java_heap="2g") as emulator:
            self.emulator = emulator
            self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=emulator.host))
            self.setup()
            published = self.publish()
            config = self.write_config()
            began = time.time()
            self.drive(config)
            dead_letters = {
                feed.name: self.read_dead_letters(feed.dead_subscription, _rejects(published, feed.name)) for feed in self.feeds
            }
            result = self.tally(published, dead_letters, began)
            result["emulator_restart"] = self.emulator_restart_scenario(config)
        return result

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        for feed in self.feeds:
            for topic, sub in ((feed.topic, feed.subscription), (feed.dead_topic, feed.dead_subscription)):
                self.adapter.ensure_topic(topic)
                self.adapter.ensure_subscription(topic, sub, ACK_DEADLINE)

    def publish(self) -> dict[Key, Published]:
        """N messages of random shapes and fates, dealt to the feeds in the ratio of their weights."""
        shapes = self.rng.choices(list(SHAPES), list(SHAPES.values()), k=self.n)
        chosen = [(shape, self.rng.choices(list(FATES_OF[shape]), list(FATES_OF[shape].values()))[0]) for shape in shapes]
        targets = [feed for feed, part in zip(self.feeds, split(self.n, [f.weight for f in self.feeds])) for _ in range(part)]
        self.rng.shuffle(targets)
        publisher = self.adapter.batch_publisher()
        futures = [
            (feed, Published(shape, fate), publisher.publish(feed.topic, f"payload {i}".encode(), fate=fate, task=shape))
            for i, ((shape, fate), feed) in enumerate(zip(chosen, targets))
        ]
        published = {(feed.name, future.result(timeout=60)): what for feed, what, future in futures}
        publisher.stop()
        return published

    def write_config(self) -> Path:
        settings: dict[str, Any] = {
            "workers": {"concurrency": 8, "async_concurrency": 20, "task_timeout": TASK_TIMEOUT},
            "leases": {"ack_deadline": ACK_DEADLINE},
            "retry": {"min_backoff": 0.5, "max_backoff": 2},
            "dead_letter": {"topic": self.feeds[0].dead_topic, "max_attempts": 20},
            "shutdown": {"drain_timeout": 15},
            "tasks": {"modules": ["chaos.tasks"], "default": "chaos"},
            "logging": {"format": "json"},
        }
        if len(self.feeds) == 1:
            settings["pubsub"] = {"subscription": self.feeds[0].subscription}
        else:
            settings["subscriptions"] = [feed.entry() for feed in self.feeds]
        config = self.dir / "consumerd.toml"
        config.write_text(to_toml(settings))
        return config

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(
            PUBSUB_EMULATOR_HOST=self.emulator.host,
            GOOGLE_CLOUD_PROJECT=PROJECT,
            PYTHONPATH=str(REPO),
            CONSUMERD_METRICS__LISTEN="127.0.0.1:0",  # two daemons run at once in the soak
            CHAOS_LEDGER=str(self.ledger.path),
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
        self.note("second daemon on the same subscriptions")
        second = self.start(config)
        time.sleep(10)
        terminate(second)
        self.note("second daemon stopped")
        return daemon

    # -- progress and results ----------------------------------------------------------------
    def settled(self) -> int:
        self.ledger.update()
        return len(self.ledger.settled)

    def wait_progress(self, fraction: float, daemon: Daemon, everything: bool = False, timeout: float = 900) -> None:
        target = self.n if everything else int(self.n * fraction)
        deadline = time.monotonic() + timeout
        assert daemon.process is not None
        while self.settled() < target:
            daemon.sample_rss()
            if daemon.process.poll() is not None:
                raise RuntimeError(f"daemon died unexpectedly with {daemon.process.returncode}")
            if time.monotonic() > deadline:
                print(f"  timed out at {self.settled()} of {target}", flush=True)
                return
            time.sleep(0.2)

    def read_dead_letters(self, dl_sub: str, expected: int) -> list[DeadLetter]:
        """Every copy on a dead-letter topic. Pulls wait (up to 5 s) while copies of fewer than
        ``expected`` messages have come; then they take only what is there, which is everything:
        the daemons have stopped, and a copy is published before its message is acked."""
        found: list[DeadLetter] = []
        while batch := _pull(self.adapter, dl_sub, wait=len({d.original_id for d in found}) < expected):
            found += batch
        return found

    def tally(self, published: dict[Key, Published], dead_letters: dict[str, list[DeadLetter]], began: float) -> dict:
        entries = self.ledger.update()
        deaths = tally.worker_deaths(self.log)
        timeline = Timeline(began, self.fault_windows(), deaths)
        per_subscription = {
            feed.name: {
                "weight": feed.weight,
                **tally.account(feed.name, feed.subscription, published, entries, dead_letters[feed.name], timeline),
            }
            for feed in self.feeds
        }
        return {
            **tally.totals(per_subscription, published, SHAPES),
            "worker_deaths": dict(Counter(d.cause for d in deaths)),
            "daemon_restarts": self.restarts,
            "orphaned_workers_left_after_sigkill": self.orphans_left,
            "peak_supervisor_rss_mb": round(self.peak_rss_mb, 1),
            "subscriptions": per_subscription,
        }

    def fault_windows(self) -> list[Window]:
        """A success in a fault's window may not have been acked because of the fault."""
        windows = []
        events = dict((what.split(" (")[0], at) for at, what in self.events)
        for at, what in self.events:
            if what.startswith("SIGKILL"):
                windows.append(Window("supervisor SIGKILLed after success, before the ack", at - 1.0, at))
            elif what.startswith("emulator frozen"):
                end = events.get("emulator resumed", at)
                windows.append(Window("emulator frozen: acks failed until the lease ran out", at - 1.0, end))
            elif what.startswith("second daemon on"):
                windows.append(Window("two daemons on the subscriptions", at, events.get("second daemon stopped", at)))
            elif what == "SIGTERM":
                windows.append(Window("SIGTERM drain", at - 1.0, at + 1.0))
        return windows

    def emulator_restart_scenario(self, config: Path, messages: int = 50) -> dict:
        """Stop and restart the emulator under a running daemon: it must survive and resume, in
        every subscription (``messages`` new ones, split evenly)."""
        daemon = self.start(config)
        self.emulator.stop()
        self.note("emulator stopped")
        time.sleep(3)
        self.emulator.start()
        self.adapter = PubSub(PubSubSettings(project=PROJECT, emulator_host=self.emulator.host))
        for feed in self.feeds:
            self.adapter.ensure_topic(feed.topic)
            self.adapter.ensure_subscription(feed.topic, feed.subscription, ACK_DEADLINE)
        mark = len(self.ledger.update())  # the new emulator numbers message ids from 1 again
        publisher = self.adapter.batch_publisher()
        parts = split(messages, [1] * len(self.feeds))
        futures = [
            (feed, publisher.publish(feed.topic, b"after restart", fate="ok")) for feed, n in zip(self.feeds, parts) for _ in range(n)
        ]
        keys = {(feed.name, future.result(timeout=60)) for feed, future in futures}
        publisher.stop()
        deadline = time.monotonic() + 120
        resumed: set[Key] = set()
        while len(resumed) < len(keys) and time.monotonic() < deadline:
            resumed = {e.key for e in self.ledger.update()[mark:] if e.mark is Mark.SUCCESS and e.key in keys}
            time.sleep(0.2)
        survived = daemon.alive()
        code = terminate(daemon)
        self.note("emulator restart scenario done")
        by_subscription = {feed.name: sum(1 for name, _ in resumed if name == feed.name) for feed in self.feeds}
        return {
            "survived": survived,
            "published": len(keys),
            "resumed": len(resumed),
            "exit_code": code,
            "resumed_by_subscription": by_subscription,
        }


def _rejects(published: dict[Key, Published], name: str) -> int:
    return sum(1 for (sub, _), p in published.items() if sub == name and p.fate == "reject")


def _pull(adapter: PubSub, sub: str, wait: bool) -> list[DeadLetter]:
    """One pull of up to 100 dead-letter copies, acked. ``wait``: up to 5 s for one to come; else
    only what is there (return_immediately, which the emulator honours)."""
    from google.api_core import exceptions as gexc

    request = {"subscription": sub, "max_messages": 100, "return_immediately": not wait}
    try:
        response = adapter.subscriber.pull(request=request, timeout=5, retry=None)
    except gexc.DeadlineExceeded:
        return []
    received = response.received_messages
    if received:
        adapter.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [m.ack_id for m in received]})
    return [
        DeadLetter(m.message.attributes["consumerd_original_message_id"], m.message.attributes["consumerd_subscription"]) for m in received
    ]


def terminate(daemon: Daemon) -> int:
    """SIGTERM (a drain) and the exit code; the chaos soak's drains may take up to two minutes."""
    daemon.sample_rss()
    daemon.stop(timeout=120)
    assert daemon.process is not None
    return daemon.process.returncode


def print_table(r: dict) -> None:
    rows = [
        ("published", r["published"]),
        ("succeeded (unique)", r["succeeded"]),
        ("LOST (published, not rejected, never succeeded)", r["lost"]),
        ("ran in a subscription it was not published to", r["strays"]),
        ("succeeded more than once", f"{r['duplicates']} {r['duplicate_causes']}"),
        (
            "rejected by tasks / dead-lettered",
            f"{r['rejected_by_tasks']} / {r['dead_lettered']} (match: {r['dead_letter_matches_rejects']})",
        ),
        *((f"  {name} (weight {one['weight']})", _subscription_row(one)) for name, one in r["subscriptions"].items()),
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


def _subscription_row(one: dict) -> str:
    return (
        f"published {one['published']}, succeeded {one['succeeded']}, lost {one['lost']}, strays {one['strays']}, "
        f"rejected {one['rejected_by_tasks']} / dead-lettered {one['dead_lettered']} (match: {one['dead_letter_matches_rejects']}), "
        f"more than once {one['duplicates']}, last settled at {one['last_settled_s']} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--subscriptions", type=int, default=2, help="topics and subscriptions the messages are split between")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="consumerd-chaos-"))
    print(f"chaos soak: {args.messages} messages, {args.subscriptions} subscriptions, seed {args.seed}, files in {workdir}", flush=True)
    result = Soak(args.messages, args.seed, workdir, args.subscriptions).run()
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    broken = (
        result["lost"] > 0
        or result["strays"] > 0
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

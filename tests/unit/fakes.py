"""Fakes for driving `Supervisor.tick()` with no process, thread, socket or clock of its own.

Each fake records what the supervisor asked of it; the clock moves only when a test (or the fake
selector's "wait") moves it, so a test of a 600 s retry runs in microseconds.
"""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path
from typing import Any

from consumerd.adapters.pubsub.client import Received, RpcCounter, SubscriptionInfo
from consumerd.adapters.pubsub.puller import PullResult
from consumerd.config import load_settings
from consumerd.ipc.held import InFlight
from consumerd.ipc.records import Outcome, Result, TaskOptions
from consumerd.message import Message
from consumerd.pool.handles import Lost, Slot, outcome_of
from consumerd.pool.pool import KillReason, RunningJob, WorkerExited, WorkerResult
from consumerd.supervisor.components import IoThreads
from consumerd.supervisor.loop import State, Supervisor
from consumerd.supervisor.stream import Stream

TASKS = ("ok", "slow")
SUBSCRIPTION = "projects/p/subscriptions/sub"  # what `write_config` names


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Log:
    """Stands in for a structlog logger: every call is recorded as (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.records.append((level, event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.records if event == name]


class Selector:
    """select() "waits" by moving the fake clock; registrations are remembered, never polled."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.registered: dict[Any, Any] = {}

    def register(self, fileobj: Any, _events: int, data: Any = None) -> None:
        self.registered[fileobj] = data

    def unregister(self, fileobj: Any) -> None:
        self.registered.pop(fileobj, None)

    def select(self, timeout: float | None = None) -> list[Any]:
        self.clock.advance(timeout or 0.0)
        return []


class Worker:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.inflight: InFlight | None = None
        self.tasks_done = 0
        self.slots: dict[int, InFlight] = {}

    @property
    def busy(self) -> bool:
        return self.inflight is not None


class Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.workers = {pid: Worker(pid) for pid in range(100, 100 + size)}
        self.killed: list[tuple[int, KillReason]] = []
        self.kill_graces: list[float] = []
        self._control_r, self._control_w = os.pipe()

    def start(self) -> dict[str, TaskOptions]:
        return {name: TaskOptions() for name in TASKS}

    @property
    def control_fd(self) -> int:
        return self._control_r

    def spawn_missing(self) -> int:
        while len(self.workers) < self.size:
            pid = max(self.workers, default=99) + 1
            self.workers[pid] = Worker(pid)
        return 0

    def retire_surplus(self) -> int:
        idle = [pid for pid, w in self.workers.items() if w.inflight is None]
        surplus = len(self.workers) - self.size
        for pid in idle[: max(0, surplus)]:
            del self.workers[pid]
        return max(0, surplus)

    def idle_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.inflight is None]

    def running(self) -> list[InFlight]:
        return [w.inflight for w in self.workers.values() if w.inflight is not None]

    def busy_count(self) -> int:
        return len(self.running())

    def jobs(self) -> list[Any]:
        return [RunningJob(w.pid, w.inflight, 0.0) for w in self.workers.values() if w.inflight is not None]

    def pick(self, mode: Any, depth: int, reserve: bool = False) -> Worker | None:
        return next((w for w in self.workers.values() if w.inflight is None), None)  # one message per worker

    def resize(self, size: int) -> None:
        self.size = size
        self.retire_surplus()

    def worker_count(self) -> int:
        return len(self.workers)

    def assign(self, worker: Worker, unit: list[InFlight], mode: Any, timeout: float, now: float, batch: bool = False) -> None:
        assert len(unit) == 1, "the fake pool runs one message per worker"
        worker.inflight = unit[0]
        unit[0].worker_pid = worker.pid

    def flush(self, now: float) -> None:
        pass

    def queued(self) -> list[InFlight]:
        return []

    def worker_running(self, message_id: str) -> Worker:
        return next(w for w in self.workers.values() if w.inflight and w.inflight.message.message_id == message_id)

    def kill_overdue(self, now: float) -> int:
        return 0

    def escalate_kills(self, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def kill_busy(self, reason: KillReason, now: float, grace: float) -> None:
        self.killed += [(w.pid, reason) for w in self.workers.values() if w.inflight]
        self.kill_graces.append(grace)

    def code_files(self) -> tuple[Any, ...]:
        return ()  # the code never changes here: a reload applies its settings at once

    def generations(self, now: float) -> list[Any]:
        return []

    def stop(self) -> None:
        os.close(self._control_r)
        os.close(self._control_w)


class Acker:
    def __init__(self) -> None:
        self.acked: list[str] = []
        self.modacked: list[tuple[str, int]] = []
        self.fail_next_acks = 0

    def ack(self, ack_ids: Any) -> None:
        if self.fail_next_acks:
            self.fail_next_acks -= 1
            raise RuntimeError("injected: ack exploded")
        self.acked += list(ack_ids)

    def modack(self, ack_ids: Any, seconds: int) -> None:
        self.modacked += [(a, seconds) for a in ack_ids]

    def flush(self, timeout: float) -> bool:
        return True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Puller:
    def __init__(self) -> None:
        self.requests: list[int] = []
        self.stopped = False
        self.last_error = ""

    def request(self, n: int) -> None:
        self.requests.append(n)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


class Forwarder:
    """A dead-letter publish that never completes (a slow or hung topic)."""

    def __init__(self) -> None:
        self.letters: list[Any] = []

    def forward(self, letter: Any) -> None:
        self.letters.append(letter)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Publisher:
    """Records the output batches it is given; a test posts their reports to the inbox."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def send(self, batch: Any) -> None:
        self.batches.append(batch)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class PubSub:
    subscription = "projects/p/subscriptions/s"

    def __init__(self, ordering: bool = False) -> None:
        self.rpcs = RpcCounter()
        self.ordering = ordering

    def describe_subscription(self) -> SubscriptionInfo:
        return SubscriptionInfo(self.subscription, "projects/p/topics/t", 10, "", 0, False, self.ordering)

    def topic_exists(self, _topic: str) -> bool:
        return True

    def close(self) -> None:
        pass


class Components:
    def __init__(self, ordering: bool = False) -> None:
        self.acker, self.puller, self.forwarder, self.publisher = Acker(), Puller(), Forwarder(), Publisher()
        self.fake_pubsub = PubSub(ordering)
        self.fake_pool: Pool | None = None

    def pool(self, spec: Any, size: int, forget: Any) -> Pool:
        self.fake_pool = Pool(size)
        return self.fake_pool

    def pubsub(self, settings: Any) -> PubSub:
        return self.fake_pubsub

    def io_threads(self, pubsub: Any, settings: Any, inbox: Any) -> IoThreads:
        forwarder = self.forwarder if settings.dead_letter.topic else None
        publisher = self.publisher if settings.publish.topics else None
        return IoThreads(self.puller, self.acker, forwarder, publisher)  # type: ignore[arg-type]


def write_config(path: Path, extra: str = "") -> Path:
    path.write_text(
        '[pubsub]\nproject = "p"\nsubscription = "sub"\nemulator_host = "127.0.0.1:1"\n'
        '[tasks]\nmodules = ["none"]\n[leases]\nack_deadline = 10\n[retry]\nmin_backoff = 10\nmax_backoff = 600\n' + extra
    )
    return path


class Harness:
    """A Supervisor in RUNNING state over fakes, with helpers to feed it pulls and results."""

    def __init__(self, config: Path, ordering: bool = False) -> None:
        self.clock = Clock()
        self.components = Components(ordering)
        self.sup = Supervisor(load_settings(config), config, clock=self.clock, components=self.components)  # type: ignore[arg-type]
        self.log = Log()
        self.sup.log = self.stream.log = self.stream.settler.log = self.sup.safety.log = self.sup.streams.log = self.log
        self.sup.selector = Selector(self.clock)  # type: ignore[assignment]
        self.sup.start_pool()
        self.sup.connect_pubsub()
        self.sup.start_io_threads()
        self.sup.notify_ready()
        self.seq = 0
        self.pull_sent_at = float("-inf")  # when the pull these results answer was sent
        assert self.sup.state is State.RUNNING

    @property
    def pool(self) -> Pool:
        assert self.components.fake_pool is not None
        return self.components.fake_pool

    @property
    def stream(self) -> Stream:
        """The one subscription `write_config` names."""
        return self.sup.streams.all[0]

    @property
    def acker(self) -> Acker:
        return self.components.acker

    def message(self, task: str = "ok", data: bytes = b"x", key: str = "", **attributes: str) -> Received:
        self.seq += 1
        msg = Message(f"m{self.seq}", data, {"task": task, **attributes}, datetime.datetime.now(datetime.UTC), None, key, SUBSCRIPTION)
        return Received(f"ack-m{self.seq}", msg)

    def pull(self, *received: Received) -> None:
        """A pull result arrives for what was asked (or for these messages, asked or not)."""
        asked = self.components.puller.requests[-1] if self.components.puller.requests else 0
        self.stream.inbox.post(PullResult(asked, list(received), sent_at=self.pull_sent_at))
        self.sup.tick()

    def finish(self, message_id: str, outcome: Outcome = Outcome.SUCCESS, **fields: Any) -> None:
        worker = self.pool.worker_running(message_id)
        inflight = worker.inflight
        assert inflight is not None
        worker.inflight = None
        result = Result(1, outcome, 0.01, **fields)
        self.sup.on_pool_events([WorkerResult(worker, inflight, result, 0.01)])  # type: ignore[arg-type]
        self.sup.tick()

    def crash(self, message_id: str, kill_reason: KillReason | None = None) -> None:
        worker = self.pool.worker_running(message_id)
        inflight, worker.inflight = worker.inflight, None
        del self.pool.workers[worker.pid]
        assert inflight is not None
        slot = Slot(1, inflight, 1, 60.0, started_at=0.0, timed_out=kill_reason is KillReason.TIMEOUT)
        lost = [Lost(inflight, outcome_of(kill_reason, slot), 0.5)]
        self.sup.on_pool_events([WorkerExited(worker, lost, [], 9, kill_reason, "killed by SIGKILL")])  # type: ignore[arg-type]
        self.sup.tick()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.sup.signals.record(signum)
        self.sup.tick()

"""The real daemon (`python -m consumerd run`) on the user's task modules against a Pub/Sub emulator,
for end-to-end tests: what the pytest plugin's `consumerd_daemon` and `dead_letters` fixtures give.

Each `Topics` is a fresh topic, its subscription, and a dead-letter topic with a subscription to
read the copies from. A `LiveDaemon` publishes to the topic and reads the daemon's JSON log: how a
message's attempt ended is a `TaskOutcome`, the same record `run_task` returns.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc

from consumerd.adapters.pubsub.client import PubSub
from consumerd.config import PubSubSettings
from consumerd.control.client import request
from consumerd.ipc.records import Outcome
from consumerd.policy.delivery import POISON
from consumerd.testing.messages import payload_bytes
from consumerd.testing.outcomes import Published, TaskOutcome

Event = dict[str, Any]
PROJECT = "test-project"
SETTLED = frozenset({"message.done", "message.failed", "message.dead_lettered"})
_names = itertools.count(1)


class Topics:
    """A topic and subscription for one test, and a dead-letter topic with a subscription on it."""

    def __init__(self, emulator_host: str, project: str = PROJECT) -> None:
        self.emulator_host = emulator_host
        self.project = project
        self.pubsub = PubSub(PubSubSettings(project=project, emulator_host=emulator_host))
        name = f"consumerd-{os.getpid()}-{next(_names)}-{uuid.uuid4().hex[:6]}"
        self.topic = f"projects/{project}/topics/{name}"
        self.subscription = f"projects/{project}/subscriptions/{name}"
        self.dead_letter_topic = f"projects/{project}/topics/{name}-dead"
        self.dead_letter_subscription = f"projects/{project}/subscriptions/{name}-dead"
        for topic, sub in ((self.topic, self.subscription), (self.dead_letter_topic, self.dead_letter_subscription)):
            self.pubsub.ensure_topic(topic)
            self.pubsub.ensure_subscription(topic, sub, ack_deadline=10)

    def publish(self, data: Any = b"", ordering_key: str = "", **attributes: str) -> str:
        """Publish one message (data as for `make_message`); returns its message id."""
        message: dict[str, Any] = {"data": payload_bytes(data), "attributes": attributes}
        if ordering_key:
            message["ordering_key"] = ordering_key
        response = self.pubsub.publisher.publish(request={"topic": self.topic, "messages": [message]}, timeout=30)
        return str(response.message_ids[0])

    def pull_dead_letters(self, timeout: float = 2.0) -> list[Published]:
        """What reached the dead-letter topic since the last pull (acked: each copy is seen once)."""
        try:
            response = self.pubsub.subscriber.pull(
                request={"subscription": self.dead_letter_subscription, "max_messages": 100}, timeout=timeout, retry=None
            )
        except gexc.DeadlineExceeded:
            return []
        received = list(response.received_messages)
        if received:
            self.pubsub.subscriber.acknowledge(
                request={"subscription": self.dead_letter_subscription, "ack_ids": [m.ack_id for m in received]}
            )
        return [Published(self.dead_letter_topic, m.message.data, dict(m.message.attributes), m.message.ordering_key) for m in received]

    def close(self) -> None:
        # The emulator keeps acked messages until their topic and subscription are deleted.
        for sub in (self.subscription, self.dead_letter_subscription):
            try:
                self.pubsub.subscriber.delete_subscription(request={"subscription": sub})
            except gexc.GoogleAPICallError:
                pass
        for topic in (self.topic, self.dead_letter_topic):
            try:
                self.pubsub.publisher.delete_topic(request={"topic": topic})
            except gexc.GoogleAPICallError:
                pass
        self.pubsub.close()


class DeadLetters:
    """The copies the daemon published to the dead-letter topic, by original message id."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.received: list[Published] = []

    def pull(self, timeout: float = 2.0) -> list[Published]:
        """Pull what arrived since the last pull; everything seen so far stays in ``received``."""
        new = self.topics.pull_dead_letters(timeout)
        self.received.extend(new)
        return new

    def wait_for(self, message_id: str, timeout: float = 30) -> Published:
        """The copy of the message ``message_id`` (its ``consumerd_original_message_id``)."""
        deadline = time.monotonic() + timeout
        while True:
            for copy in self.received:
                if copy.attributes.get("consumerd_original_message_id") == message_id:
                    return copy
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no dead-letter copy of message {message_id} within {timeout}s")
            self.pull(min(remaining, 2.0))


class LiveDaemon:
    """`python -m consumerd run` on ``modules``, consuming ``topics.subscription``."""

    def __init__(self, topics: Topics, modules: list[str], workdir: Path, config: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.topics = topics
        self.workdir = workdir
        # A socket path must fit in 108 bytes: a directory of its own under the system's temp dir.
        self.control_socket = os.path.join(tempfile.mkdtemp(prefix="consumerd-"), "control.sock")
        settings: dict[str, dict[str, Any]] = {
            "pubsub": {"subscription": topics.subscription, "project": topics.project, "emulator_host": topics.emulator_host},
            "tasks": {"modules": list(modules)},
            "workers": {"concurrency": 2},
            "dead_letter": {"topic": topics.dead_letter_topic},
            "logging": {"format": "json", "level": "info"},
            "metrics": {"listen": "127.0.0.1:0"},  # any free port: several daemons may run at once
            "control": {"socket": self.control_socket},
            "shutdown": {"drain_timeout": 20},
        }
        for section, values in (config or {}).items():
            settings.setdefault(section, {}).update(values)
        self.drain_timeout = float(settings["shutdown"].get("drain_timeout", 20))
        self.config_path = workdir / "consumerd.toml"
        self.config_path.write_text(to_toml(settings))
        self.events: list[Event] = []
        self.lines: list[str] = []
        self.stderr = ""
        self._cond = threading.Condition()
        self._seen: dict[str, int] = {}
        self.process: subprocess.Popen[str] | None = None

    # -- life -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LiveDaemon:
        """Start it and wait until it logged `daemon.ready` (its workers and the subscription checked out)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumerd", "run", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=daemon_environment(),
            cwd=os.getcwd(),
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self._wait(lambda: self._find("daemon.ready"), timeout, "daemon.ready")
        return self

    def stop(self, timeout: float | None = None) -> int:
        """Drain (SIGTERM) and wait for the exit; SIGKILL past ``timeout``. Returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout if timeout is not None else self.drain_timeout + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        code = self.process.wait()
        shutil.rmtree(os.path.dirname(self.control_socket), ignore_errors=True)
        return code

    # -- use ------------------------------------------------------------------------------------
    def publish(self, data: Any = b"", ordering_key: str = "", **attributes: str) -> str:
        """Publish one message to the daemon's topic (data as for `make_message`); its message id."""
        return self.topics.publish(data, ordering_key, **attributes)

    def wait_for(self, message_id: str, timeout: float = 30, attempt: int = 1) -> TaskOutcome:
        """How the ``attempt``-th attempt at ``message_id`` ended, once the daemon settled it: acked
        (`message.done`), given back (`message.failed`), or dead-lettered (`message.dead_lettered`)."""

        def settled() -> Event | None:
            return self._find(SETTLED, message_id=message_id, attempt=attempt)

        event = self._wait(settled, timeout, f"message {message_id} (attempt {attempt})")
        with self._cond:
            return outcome_from_log(event, list(self.events))

    def status(self) -> dict[str, Any]:
        """The `status` command's answer over the control socket."""
        return request(self.control_socket, "status")

    def select(self, event: str, **fields: Any) -> list[Event]:
        """Every logged event named ``event`` with these fields."""
        with self._cond:
            return [e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    # -- the log --------------------------------------------------------------------------------
    def _find(self, names: str | frozenset[str], **fields: Any) -> Event | None:
        wanted = frozenset({names}) if isinstance(names, str) else names
        with self._cond:
            for e in self.events:
                if e.get("event") in wanted and all(e.get(k) == v for k, v in fields.items()):
                    return e
        return None

    def _wait(self, found: Callable[[], Event | None], timeout: float, what: str) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                event = found()
                if event is not None:
                    return event
                remaining = deadline - time.monotonic()
                exited = self.process is not None and self.process.poll() is not None
                if remaining <= 0 or exited:
                    tail = "".join(self.lines[-15:]) + self.stderr[-2000:]
                    state = f"exited with {self.process.returncode}" if exited and self.process else "still running"
                    raise AssertionError(f"waited {timeout}s for {what}; the daemon is {state}; its last lines:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    self.events.append(event)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        self.stderr = self.process.stderr.read()


def outcome_from_log(event: Event, events: list[Event]) -> TaskOutcome:
    """The `TaskOutcome` of the attempt ``event`` settled; a dead-lettered one takes its error from
    the `message.rejected` event the daemon logged when it decided to forward it."""
    mid, how, error = event["message_id"], str(event.get("outcome", "")), str(event.get("error", ""))
    if event["event"] == "message.done":
        return TaskOutcome(mid, how, acked=True)
    if event["event"] == "message.dead_lettered":
        decided = [
            e
            for e in events
            if e.get("event") == "message.rejected" and e.get("message_id") == mid and e.get("attempt") == event.get("attempt")
        ]
        rejected = decided[0] if decided else {}
        return TaskOutcome(mid, str(rejected.get("outcome", how)), rejected=str(rejected.get("error", "")))
    if how == Outcome.RETRY:
        return TaskOutcome(mid, how, retry_after=float(event["retry_in_s"]))
    if how in POISON:  # no dead-letter topic configured: held at the maximum backoff
        return TaskOutcome(mid, how, rejected=error)
    return TaskOutcome(mid, how, failed=error)


def daemon_environment() -> dict[str, str]:
    """This process's environment without consumerd's own settings and systemd's channels, with
    this process's import path (the user's task modules import as they do in the tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "NOTIFY_SOCKET", "WATCHDOG_", "PUBSUB_EMULATOR_HOST"))}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env


def to_toml(settings: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> str:
    """A config file's text: a section per mapping, an array of tables per list of them
    ([[subscriptions]]); a mapping inside a section is an inline table."""
    out = []
    for section, values in settings.items():
        for table in [values] if isinstance(values, Mapping) else values:
            out.append(f"[[{section}]]" if not isinstance(values, Mapping) else f"[{section}]")
            out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
            out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are spelled the same in TOML

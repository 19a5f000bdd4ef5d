"""The real daemon as a child process, its JSON log events, and a real notify socket.

The one helper the tests, the benchmarks and the chaos soak use to run `consumerd run`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.procinfo import status_kb, workers_of

Event = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
PROJECT = "test-project"


class Daemon:
    """`python -m consumerd run` with its stdout parsed into events a test can wait for."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        command: list[str] | None = None,
        cwd: Path = REPO,
        nofile: int | None = None,
        log: Path | None = None,
        only: frozenset[str] | None = None,
        run_args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.env = env
        self.command = command or [sys.executable, "-m", "consumerd"]
        self.cwd = cwd
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) for the daemon
        self.log = log.open("a") if log else None  # every line, appended (one file across restarts)
        self.only = only  # parse and keep only these events (the benchmarks: no CPU spent on the rest)
        self.run_args = run_args  # after `run --config PATH`, e.g. ("--reload",)
        self.peak_rss_mb = 0.0
        self._reader_done = threading.Event()
        self.events: list[Event] = []
        self.raw: list[str] = []
        self.stderr = ""
        self._cond = threading.Condition()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Daemon:
        command = [*self.command, "run", "--config", str(self.config), *self.run_args]
        self.process = subprocess.Popen(
            with_nofile(command, self.nofile) if self.nofile else command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
            cwd=self.cwd,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def _read_stdout(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            if self.log:
                self.log.write(line)
            if self.only is not None and not any(f'"{name}"' in line for name in self.only):
                continue
            with self._cond:
                self.raw.append(line)
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
                self._cond.notify_all()
        if self.log:
            self.log.close()
        self._reader_done.set()

    def _read_stderr(self) -> None:
        assert self.process and self.process.stderr
        self.stderr = self.process.stderr.read()

    @property
    def pid(self) -> int:
        assert self.process
        return self.process.pid

    def mark(self) -> int:
        """A position in the event stream: pass it as ``since`` to look only at later events."""
        with self._cond:
            return len(self.events)

    def select(self, event: str, since: int = 0, **fields: Any) -> list[Event]:
        with self._cond:
            return self._matching(event, since, fields)

    def _matching(self, event: str, since: int, fields: dict[str, Any]) -> list[Event]:
        return [e for e in self.events[since:] if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = 30, since: int = 0, **fields: Any) -> list[Event]:
        """Block until ``count`` events named ``event`` (with ``fields``) were logged after ``since``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._matching(event, since, fields)
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process and self.process.poll() is not None and not self._more_coming()):
                    raise AssertionError(
                        f"waited {timeout}s for {count} x {event} {fields}, saw {len(found)}; "
                        f"exit={self.process.poll() if self.process else None}; last lines:\n{''.join(self.raw[-15:])}\n{self.stderr[-2000:]}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_for_ids(self, event: str, ids: set[str], timeout: float = 30, since: int = 0, **fields: Any) -> list[Event]:
        """Block until an ``event`` was logged for every message id in ``ids``; return those events."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.select(event, since, **fields) if e.get("message_id") in ids]
            if {e["message_id"] for e in found} >= ids:
                return found
            self.wait_for(event, count=len(found) + 1, timeout=max(0.0, deadline - time.monotonic()), since=since, **fields)

    def _more_coming(self) -> bool:
        return bool(self.process and self.process.stdout and not self.process.stdout.closed)

    def signal(self, signum: int) -> None:
        assert self.process
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process
        return self.process.wait(timeout)

    def wait_ready(self, timeout: float = 60) -> Event:
        return self.wait_for("daemon.ready", timeout=timeout)[0]

    def alive(self) -> bool:
        return bool(self.process and self.process.poll() is None)

    def stop(self, timeout: float = 30) -> Event | None:
        """SIGTERM (drain) and wait; SIGKILL past ``timeout``. Returns the daemon.stopped event, if any."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.stopped_event()

    def stopped_event(self) -> Event | None:
        self._reader_done.wait(2)  # the reader thread may still be reading the last lines
        found = self.select("daemon.stopped")
        return found[-1] if found else None

    def kill(self) -> None:
        assert self.process
        self.process.kill()
        self.process.wait()

    def workers(self) -> list[int]:
        return workers_of(self.pid)

    def sample_rss(self) -> float:
        self.peak_rss_mb = max(self.peak_rss_mb, (status_kb(self.pid, "VmHWM") or 0) / 1024)
        return self.peak_rss_mb

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, read: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify-")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        if read:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate([m for _, m in self.messages]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"notify socket: condition not met in {timeout}s; got {self.messages[-10:]}")
                self._cond.wait(remaining)
            return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


# Sets RLIMIT_NOFILE, then becomes the command. Not a preexec_fn: that runs Python between fork and
# exec in a child of this process, which holds live gRPC clients (the tests' broker), and gRPC's
# fork handlers restart its poller there, which aborts once the child closes its descriptors.
_WITH_NOFILE = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execvp(sys.argv[2], sys.argv[2:])"


def with_nofile(command: list[str], nofile: int) -> list[str]:
    """``command``, run with ``nofile`` as its descriptor limit (soft and hard)."""
    return [sys.executable, "-c", _WITH_NOFILE, str(nofile), *command]


def daemon_env(emulator_host: str, ledger_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUMERD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(
        PUBSUB_EMULATOR_HOST=emulator_host,
        GOOGLE_CLOUD_PROJECT=PROJECT,
        TEST_LEDGER_DIR=str(ledger_dir),
        PYTHONPATH=str(REPO),
        CONSUMERD_METRICS__LISTEN="127.0.0.1:0",  # any free port: tests run several daemons at once
    )
    env.update(extra)
    return env

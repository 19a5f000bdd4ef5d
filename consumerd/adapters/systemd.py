"""The sd_notify side of systemd: READY, STATUS, WATCHDOG, STOPPING, RELOADING; a no-op without it.

Built on the `sdnotify` package's socket set-up, with one change that matters: the socket is made
non-blocking and a send that would block is dropped and counted. With the package's blocking send,
a reader that stops reading would freeze the whole daemon; a notification is never worth stalling
the loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.dropped = 0
        self.sent = 0
        self._socket = _connect() if os.environ.get("NOTIFY_SOCKET") else None
        self.enabled = self._socket is not None
        self.watchdog_interval = _watchdog_interval(os.environ)
        self._next_ping = 0.0

    def notify(self, *fields: str) -> bool:
        if self._socket is None:
            return False
        try:
            self._socket.send("\n".join(fields).encode())
        except OSError:  # BlockingIOError (reader not reading), ConnectionRefusedError (reader gone)
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_due(self, now: float) -> float | None:
        """Monotonic time of the next watchdog ping, or None when systemd did not ask for one."""
        if self.watchdog_interval is None or self._socket is None:
            return None
        return self._next_ping

    def ping_watchdog(self, now: float) -> None:
        """Send WATCHDOG=1 if due. Call from the main loop only, after a healthy iteration."""
        if self.watchdog_interval is None or now < self._next_ping:
            return
        self.notify("WATCHDOG=1")
        self._next_ping = now + self.watchdog_interval


def _connect() -> socket.socket | None:
    # sdnotify reads NOTIFY_SOCKET (abstract "@" addresses included) and connects a datagram socket.
    notifier = sdnotify.SystemdNotifier(debug=False)
    sock = notifier.socket
    if sock is None:
        return None
    sock.setblocking(False)
    return sock


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None if not for this process."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2 / 1_000_000

"""Where the I/O threads post results for the supervisor's loop: a queue plus a wake-up pipe.

The loop selects on `fd`; a thread `post`s an item and writes one byte, so the loop wakes at once
without polling, and never blocks on a thread.
"""

from __future__ import annotations

import os
import queue
from typing import Any


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.fd, self._wake_w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_w, False)

    def post(self, item: Any) -> None:
        self._queue.put(item)
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full, so the loop is already awake

    def take_all(self) -> list[Any]:
        """Everything posted so far (and clear the wake-up bytes)."""
        drain_fd(self.fd)
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items


def drain_fd(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

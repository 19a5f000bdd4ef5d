"""A thread that takes work from the loop, does one blocking job at a time, and posts each result to
the supervisor's inbox: the shape of the dead-letter forwarder and the output publisher."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Generic, TypeVar

import structlog
from structlog.stdlib import BoundLogger

from consumerd.ipc.inbox import Inbox

Work = TypeVar("Work")


class Handoff(Generic[Work]):
    def __init__(self, name: str, inbox: Inbox, labels: Mapping[str, str] | None = None) -> None:
        self._inbox = inbox
        self._queue: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._stopping = threading.Event()  # retries end early once set: what is left is reported failed
        self._thread = threading.Thread(target=self._run, name=f"consumerd-{name}", daemon=True)
        self.log: BoundLogger = structlog.get_logger(f"consumerd.{name}").bind(**(labels or {}))  # labels: the subscription

    def start(self) -> None:
        self._thread.start()

    def put(self, work: Work) -> None:
        self._queue.put(work)

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            self._inbox.post(self.handle(work))

    def handle(self, work: Work) -> object:
        """Do the job (on this thread); what it returns goes to the inbox."""
        raise NotImplementedError

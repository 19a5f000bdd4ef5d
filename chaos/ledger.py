"""The soak's ledger: what the tasks ran, in a file the daemon does not own (CHAOS_LEDGER).

The tasks (chaos/tasks.py) append one line per event of a run, `subscription message_id attempt
pid mark time`: the subscription by its short name (the last part of `Message.subscription`, so a
message is accounted for in the subscription it was delivered from), the time by the wall clock,
which the harness compares with the times of its faults. The harness reads it back as `Entry`s.
"""

from __future__ import annotations

import os
import time
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from consumerd import Message

Key = tuple[str, str]  # (subscription, message id): a message id is unique only within its topic


class Mark(StrEnum):
    START = "start"  # before the work; a run that crashes leaves only this
    SUCCESS = "success"  # just before the task returns
    REJECT = "reject"  # before it rejects the message


class Entry(NamedTuple):
    subscription: str
    message_id: str
    attempt: int
    pid: int
    mark: Mark
    at: float  # time.time()

    @property
    def key(self) -> Key:
        return (self.subscription, self.message_id)


def short_name(subscription: str) -> str:
    """projects/P/subscriptions/NAME -> NAME."""
    return subscription.rpartition("/")[2]


def record(msg: Message, mark: Mark) -> None:
    """Append one line (one write of a file opened O_APPEND: whole lines, whoever writes at once)."""
    line = f"{short_name(msg.subscription)} {msg.message_id} {msg.delivery_attempt or 0} {os.getpid()} {mark} {time.time():.3f}\n"
    fd = os.open(os.environ["CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def runs_started(msg: Message) -> int:
    """How many runs of this message (in its subscription) have started, this one included."""
    prefix = f"{short_name(msg.subscription)} {msg.message_id} ".encode()
    try:
        with open(os.environ["CHAOS_LEDGER"], "rb") as handle:
            return sum(1 for line in handle if line.startswith(prefix) and f" {Mark.START} ".encode() in line)
    except FileNotFoundError:
        return 0


def _parse(line: str) -> Entry:
    subscription, message_id, attempt, pid, mark, at = line.split()
    return Entry(subscription, message_id, int(attempt), int(pid), Mark(mark), float(at))


class Reader:
    """The ledger as the harness sees it, read incrementally: each `update` parses only what was
    appended since the last one (the soak polls it several times a second)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self.settled: set[Key] = set()  # a success or a reject was recorded
        self._offset = 0

    def update(self) -> list[Entry]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return self.entries
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            entry = _parse(line)
            self.entries.append(entry)
            if entry.mark is not Mark.START:
                self.settled.add(entry.key)
        return self.entries

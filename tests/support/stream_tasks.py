"""Tasks for the several-subscriptions tests: each records which subscription its message came
from and when it started and ended, in a ledger of its own (`start|done id subscription time`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from consumerd import Message, Reject, task


def _record(event: str, msg: Message) -> None:
    line = f"{event} {msg.message_id} {msg.subscription.rpartition('/')[2]} {time.time():.6f}\n"
    fd = os.open(Path(os.environ["TEST_LEDGER_DIR"]) / "streams.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task("stream_sleep")
def stream_sleep(msg: Message) -> None:
    _record("start", msg)
    time.sleep(float(msg.attributes.get("seconds", "0.1")))
    _record("done", msg)


@task("stream_reject")
def stream_reject(msg: Message) -> None:
    raise Reject(f"rejected from {msg.subscription}")


def ledger(directory: Path) -> list[tuple[str, str, str, float]]:
    try:
        lines = (directory / "streams.txt").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(e, mid, sub, float(t)) for e, mid, sub, t in (line.split() for line in lines)]


def peak_running(entries: list[tuple[str, str, str, float]], subscription: str) -> int:
    """The most of ``subscription``'s tasks that ran at once, by the tasks' own clock."""
    events = sorted((t, 1 if e == "start" else -1) for e, _, sub, t in entries if sub == subscription)
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak

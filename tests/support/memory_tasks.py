"""Tasks that use memory on purpose, for the memory-limit tests (ledger lines as in `tasks`)."""

from __future__ import annotations

import os

from consumerd import Message, task
from tests.support.tasks import record, runs_so_far

LEAKED: list[bytes] = []  # what `leak` keeps: it grows with every call in a worker


def rss_mb() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


@task("leak")
def leak(msg: Message) -> None:
    """Keeps ``mb`` MiB (default 50) more with every call, written so it is resident."""
    record("start", msg)
    LEAKED.append(b"\xa5" * (int(msg.json().get("mb", 50)) * 2**20))
    record(f"rss_mb={rss_mb()}", msg)
    record("done", msg)


@task("allocate_once")
def allocate_once(msg: Message) -> None:
    """On its first run asks for ``gb`` GiB at once (default 2); on a later run for 10 MiB."""
    record("start", msg)
    size = int(float(msg.json().get("gb", 2)) * 2**30) if runs_so_far(msg) == 1 else 10 * 2**20
    block = bytearray(size)
    record(f"allocated={len(block)}", msg)
    record("done", msg)

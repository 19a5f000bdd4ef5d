"""Worker hooks for the tests: counted in the ledger, once per worker."""

import os
from pathlib import Path

from consumerd import on_worker_start, on_worker_stop


def _note(line: str) -> None:
    with open(Path(os.environ["TEST_LEDGER_DIR"]) / "hooks.txt", "a") as handle:
        handle.write(f"{line} {os.getpid()}\n")


@on_worker_start
def opened() -> None:
    if os.environ.get("FAIL_START_HOOK"):
        raise ConnectionError("the database is unreachable (on purpose)")
    _note("start")


@on_worker_stop
def closed() -> None:
    _note("stop")

"""Tasks that probe the container from inside task code; each records what it found in the ledger.

Imported by the daemon in the container (tests/ is mounted on its module path), never by pytest.
"""

from __future__ import annotations

import os

from consumerd import Message, task
from tests.support.tasks import record


@task("open_path")
def open_path(msg: Message) -> None:
    """Try to read the file named by the `path` attribute: `opened:PATH` or `denied:PATH:ERROR`."""
    path = msg.attributes["path"]
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        record(f"opened:{path}", msg)
    except OSError as exc:
        record(f"denied:{path}:{type(exc).__name__}", msg)
    record("done", msg)


@task("write_path")
def write_path(msg: Message) -> None:
    """Try to create the file named by the `path` attribute: `wrote:PATH` or `refused:PATH:ERRNO`."""
    path = msg.attributes["path"]
    try:
        with open(path, "w") as handle:
            handle.write("x")
        record(f"wrote:{path}", msg)
    except OSError as exc:
        record(f"refused:{path}:{os.strerror(exc.errno or 0).replace(' ', '_')}", msg)
    record("done", msg)


@task("whoami")
def whoami(msg: Message) -> None:
    """The task's uid, and which of the daemon's credential variables it can see."""
    record(f"uid:{os.getuid()}", msg)
    for name in ("CREDENTIALS_DIRECTORY", "GOOGLE_APPLICATION_CREDENTIALS", "CONSUMERD_PUBSUB__CREDENTIALS_FILE"):
        record(f"env:{name}:{'seen' if name in os.environ else 'absent'}", msg)
    record("done", msg)

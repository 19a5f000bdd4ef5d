"""Prometheus file-based service discovery: the target file that tells a Prometheus on this host
where this daemon's /metrics is, whichever port it got.

Prometheus watches the files its `file_sd_configs` glob names and re-reads one when it changes, so
the file is replaced whole (a temporary file in the same directory, then a rename) and never seen
half-written; the temporary name does not end in `.json`, so no glob picks it up.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

# A wildcard address serves loopback too: what a local Prometheus can connect to.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}
# Prometheus runs as a user of its own: the content is an address and labels, nothing secret, and
# the units' UMask=0077 would otherwise make the file unreadable to it.
MODE = 0o644


def scrape_address(address: str) -> str:
    """HOST:PORT as a scraper on this host reaches it."""
    host, _, port = address.rpartition(":")
    return f"{_LOOPBACK.get(host, host)}:{port}"


def target_groups(address: str, labels: Mapping[str, str]) -> bytes:
    """The file's content: one target group, in the JSON form file_sd reads."""
    groups = [{"targets": [scrape_address(address)], "labels": dict(labels)}]
    return (json.dumps(groups, indent=2, sort_keys=True) + "\n").encode()


class TargetFile:
    """One daemon's entry. `write` raises OSError (the caller decides it is not fatal); `remove`
    takes away only what this daemon wrote, so that a second daemon given the same path by mistake
    keeps its entry when the first stops."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: bytes | None = None

    def write(self, address: str, labels: Mapping[str, str]) -> None:
        content = target_groups(address, labels)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, MODE)
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), MODE)  # open()'s mode is filtered by the umask
                handle.write(content)
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._written = content

    def remove(self) -> None:
        if self._written is None:
            return
        with contextlib.suppress(OSError):  # gone already (systemd removes the runtime directory), or never ours
            if self.path.read_bytes() == self._written:
                self.path.unlink()
        self._written = None

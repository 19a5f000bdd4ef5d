"""The open-file limit the supervisor depends on, and the concurrency it can hold.

The supervisor holds one socket per worker besides a fixed set (gRPC channels, threads' pipes, the
selector, the notify and journal sockets). Running out of descriptors mid-run truncates the fork
server's SCM_RIGHTS packets and loses workers, so the limit is raised at start-up and a concurrency
it cannot hold is refused before any worker starts. Pure except `raise_nofile`.
"""

from __future__ import annotations

import resource

from consumerd.adapters.probes import MAX_CONNECTIONS
from consumerd.control.server import MAX_CLIENTS
from consumerd.errors import ConfigError

# What the supervisor holds besides its workers: gRPC channels, pipes and sockets, with room to
# spare, plus the most the probe server and the control socket hold at once under a flood.
BASE_FDS = 64 + MAX_CONNECTIONS + MAX_CLIENTS
FDS_PER_WORKER = 2  # its channel, plus one in transit while a replacement is adopted


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def max_concurrency(nofile: int) -> int:
    """The most workers ``nofile`` descriptors can hold (0: not even one)."""
    return max(0, (nofile - BASE_FDS) // FDS_PER_WORKER)


def check_concurrency(concurrency: int, nofile: int) -> None:
    ceiling = max_concurrency(nofile)
    if concurrency > ceiling:
        raise ConfigError(
            f"workers.concurrency = {concurrency} needs {BASE_FDS + FDS_PER_WORKER * concurrency} file descriptors, "
            f"the limit is {nofile} (raise LimitNOFILE= / ulimit -n, or lower concurrency to {ceiling} at most)"
        )

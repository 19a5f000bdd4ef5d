"""A worker's memory: the hard cap it runs under, its OOM score, and its size after each task.

Set once after fork, before any task (`confine`):

- RLIMIT_DATA at `workers.memory_limit`, soft and hard (task code cannot lift it): an allocation past
  it fails, so the task gets a MemoryError, an ordinary failure of its message, instead of the host's
  OOM killer. RLIMIT_DATA counts the heap and private writable mappings; RLIMIT_AS would also count
  the 64 MiB of address space glibc reserves per thread's malloc arena, so a worker that inherited
  a few threads' arenas fails long before it uses its budget.
- oom_score_adj raised by OOM_SCORE_RAISE over what it inherited (the supervisor's): under memory
  pressure the kernel kills a worker, whose message is retried, before the process that holds every
  lease. Raising one's own score needs no privilege.

After each task (`Watch.after`): one pread of /proc/self/statm, about a microsecond. A worker whose
RSS is above `workers.max_memory_per_child`, or whose data is within a tenth of `memory_limit` (what
a task left there would fail every later one), flags that call's last result `over_memory`: the
supervisor sends it no new job and closes its channel once it holds none, and it exits. No task is
interrupted; the pool forks a replacement meanwhile.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import resource
import traceback

from structlog.stdlib import BoundLogger

from consumerd.ipc.records import BatchJob, MemoryLimits, Outcome, Result, Unit

PAGE = os.sysconf("SC_PAGE_SIZE")
OOM_SCORE_RAISE = 500  # over the supervisor's; the kernel's scale is -1000..1000
NEAR_CAP = 0.9  # data above this share of memory_limit after a task: the worker retires
OUT_OF_MEMORY = "MemoryError: out of memory while reporting the task's failure"


class Why(enum.StrEnum):
    """Why a worker retires for its memory."""

    RSS = "rss"  # resident memory above max_memory_per_child
    NEAR_CAP = "near_cap"  # data within a tenth of memory_limit
    EXHAUSTED = "exhausted"  # not even the few bytes to measure it were left


def over_limits(rss: int, data: int, limits: MemoryLimits) -> Why | None:
    """Whether a worker of this size (bytes) retires after its task, and why (None: it goes on)."""
    if limits.retire_above and rss > limits.retire_above:
        return Why.RSS
    if limits.hard_cap and data > limits.hard_cap * NEAR_CAP:
        return Why.NEAR_CAP
    return None


class Watch:
    """Measures the worker after each call and flags the result after which it must retire."""

    def __init__(self, limits: MemoryLimits, log: BoundLogger) -> None:
        self.limits = limits
        self.log = log
        self.active = bool(limits.retire_above or limits.hard_cap)
        self.retiring = False
        self._statm = -1

    def after(self, results: list[Result]) -> list[Result]:
        """``results`` as they go to the supervisor: the last flagged when this call left the worker
        past its limits (once; it runs what it already holds, then exits)."""
        if not self.active or self.retiring or not results:
            return results
        try:
            rss, data = self.size()
            why = over_limits(rss, data, self.limits)
        except MemoryError:
            rss = data = 0
            why = Why.EXHAUSTED
        except OSError as exc:  # no /proc: the worker runs on, unmeasured
            self.active = False
            self.log.warning("worker.memory_unmeasured", error=f"{type(exc).__name__}: {exc}")
            return results
        if why is None:
            return results
        self.retiring = True
        self.log.info(
            "worker.memory_retired",
            reason=why.value,
            rss=rss,
            data=data,
            max_memory_per_child=self.limits.retire_above,
            memory_limit=self.limits.hard_cap,
        )
        return [*results[:-1], dataclasses.replace(results[-1], over_memory=True)]

    def size(self) -> tuple[int, int]:
        """Resident and data size in bytes (/proc/self/statm, kept open: one pread per call)."""
        try:
            return sizes(os.pread(self._statm, 96, 0))
        except OSError:  # not opened yet, or a task closed it
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
            return sizes(os.pread(self._statm, 96, 0))


def sizes(statm: bytes) -> tuple[int, int]:
    """Resident and data (heap, private mappings and stack) bytes from a statm line (in pages)."""
    fields = statm.split()
    return int(fields[1]) * PAGE, int(fields[5]) * PAGE


def confine(limits: MemoryLimits, log: BoundLogger) -> None:
    """In a new worker, before any task: its OOM score above the supervisor's, its hard cap."""
    raise_oom_score(log)
    if limits.hard_cap:
        cap_data(limits.hard_cap, log)


def raise_oom_score(log: BoundLogger, path: str = "/proc/self/oom_score_adj") -> int | None:
    """Raise this process's OOM score by OOM_SCORE_RAISE (at most 1000); the new value, or None."""
    try:
        with open(path, "rb") as current:
            value = min(1000, int(current.read()) + OOM_SCORE_RAISE)
        with open(path, "wb") as new:
            new.write(b"%d" % value)
    except (OSError, ValueError) as exc:
        log.warning("worker.oom_score_unchanged", error=f"{type(exc).__name__}: {exc}")
        return None
    return value


def cap_data(limit: int, log: BoundLogger) -> None:
    """RLIMIT_DATA at ``limit`` (or the lower hard limit already in place), soft and hard."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    except (OSError, ValueError) as exc:
        log.warning("worker.memory_limit_not_set", memory_limit=limit, error=f"{type(exc).__name__}: {exc}")
        return
    with open("/proc/self/statm", "rb") as statm:
        _, data = sizes(statm.read())
    if data > cap * NEAR_CAP:
        log.error("worker.memory_limit_too_low", memory_limit=cap, data=data)


def release(exc: BaseException) -> None:
    """Before a MemoryError is logged: drop the locals of the frames it went through, which hold
    what the task allocated, so the worker has room again to report the failure."""
    if isinstance(exc, MemoryError):
        traceback.clear_frames(exc.__traceback__)


def out_of_memory(unit: Unit) -> list[Result]:
    """A call whose failure could not even be reported (a MemoryError while logging it or in its
    hooks): an ordinary failure of each of its messages, retried with backoff."""
    jobs = unit.jobs if isinstance(unit, BatchJob) else (unit,)
    return [Result(job.seq, Outcome.ERROR, 0.0, OUT_OF_MEMORY) for job in jobs]

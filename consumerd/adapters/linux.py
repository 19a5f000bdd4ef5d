"""Linux process primitives the daemon needs and Python's os module lacks: prctl(2), process groups, /proc.

One ctypes handle on the C library, loaded once per process (a forked child inherits it). Failures
are OSError with the kernel's errno, like the os module's own calls.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

PR_SET_PDEATHSIG = 1  # a signal for this process when its parent exits
PR_SET_DUMPABLE = 4  # 0: no core dumps, /proc/<pid> files become root's, no ptrace by the same user
PR_SET_CHILD_SUBREAPER = 36  # orphaned descendants are reparented here instead of to init
PR_SET_NO_NEW_PRIVS = 38  # exec never grants privileges (needed to apply Landlock unprivileged)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process, with errno kept for `ctypes.get_errno()`; `syscall` returns a long."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def prctl(option: int, value: int) -> None:
    """prctl(option, value, 0, 0, 0); OSError (with errno and strerror) when the kernel refuses."""
    call = getattr(libc(), "prctl", None)
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if call(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def kill_group(pgid: int, signum: int) -> None:
    """Signal the process group ``pgid``. One that is gone, or whose id now belongs to someone
    else's process (EPERM), is left alone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def children_of(pid: int) -> list[int]:
    """Direct children of the single-threaded process ``pid`` (this one), from /proc: no scan of
    every process. The file stays open and is re-read with pread, cheaper than opening it again:
    a worker reads it after every job."""
    try:
        fd = _children_fds.get(pid)
        if fd is None:
            fd = _children_fds[pid] = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC)
        return [int(child) for child in os.pread(fd, 1 << 16, 0).split()]
    except OSError:
        return []


_children_fds: dict[int, int] = {}  # pid -> open /proc children file (a forked worker opens its own)

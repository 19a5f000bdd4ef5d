"""Which files the task code came from, as the fork server loaded it: for a reload to compare.

The fork server lists them in its Ready packet (path, mtime, size), so the supervisor can tell
whether the code on disk changed without importing any of it. Listed: every module the task
modules' import brought in, except the standard library and installed third-party packages, unless
they belong to a task module's own top-level package (a project installed in site-packages counts);
the task modules first, then the rest by path, as many as fit in one control packet.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback
from collections.abc import Iterable

from consumerd.ipc.records import (
    MAX_CODE_FILES,
    MAX_PATH_CHARS,
    MAX_TRACEBACK_CHARS,
    CodeFile,
    PreloadFailed,
    Ready,
    TaskOptions,
    encode_control,
)
from consumerd.worker import registry

_INSTALLED = tuple(
    {
        os.path.join(os.path.realpath(path), "")
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (path := sysconfig.get_paths().get(key))
    }
)


def loaded_files(before: Iterable[str], task_modules: Iterable[str]) -> list[CodeFile]:
    """The source files of the modules imported since ``before`` (module names), task modules first."""
    earlier, tasks = set(before), set(task_modules)
    tops = {name.partition(".")[0] for name in tasks}
    first: set[str] = set()
    rest: set[str] = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or (name in earlier and name not in tasks):
            continue
        path = os.path.abspath(path)
        if name.partition(".")[0] not in tops and os.path.realpath(path).startswith(_INSTALLED):
            continue  # the standard library, or a third-party package: a restart brings a new one
        (first if name in tasks else rest).add(path)
    return [f for path in sorted(first) + sorted(rest - first) if (f := _stat(path)) is not None]


def _stat(path: str) -> CodeFile | None:
    if len(path) > MAX_PATH_CHARS:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return CodeFile(path, st.st_mtime_ns, st.st_size)


def ready_packet(tasks: tuple[tuple[str, TaskOptions], ...], files: list[CodeFile]) -> tuple[Ready, int]:
    """The Ready packet with as many of ``files`` as fit (the first ones), and how many were left out."""
    low, high = 0, min(len(files), MAX_CODE_FILES)
    while low < high:  # the most that fit in one control packet
        middle = (low + high + 1) // 2
        try:
            encode_control(Ready(tasks, tuple(files[:middle])))
            low = middle
        except ValueError:
            high = middle - 1
    return Ready(tasks, tuple(files[:low])), len(files) - low


def preload_failed(exc: BaseException) -> PreloadFailed:
    """What the supervisor hears when importing the task code failed: the one-line error, and the
    traceback of what the task code raised (the registry's error hides it as its context), from the
    task code's first frame: the import machinery's and the registry's are left out."""
    raised = exc.__cause__ or exc.__context__ or exc
    report = traceback.TracebackException.from_exception(raised)
    report.stack = traceback.StackSummary.from_list([f for f in report.stack if not _machinery(f.filename)])
    text = "".join(report.format())[-MAX_TRACEBACK_CHARS:]
    while True:
        packet = PreloadFailed(str(exc), text)
        try:
            encode_control(packet)
            return packet
        except ValueError:  # escaped characters made it longer than a packet
            text = text[len(text) // 2 :]


def _machinery(filename: str) -> bool:
    return filename.startswith("<frozen ") or filename in (importlib.__file__, registry.__file__)

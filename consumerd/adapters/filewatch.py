"""`consumerd run --reload`: watch the task code's files on a thread, post `FilesChanged` for the loop.

The only module that imports `watchfiles` (the `dev` extra: pip install 'consumerd[dev]'). It watches
the directories of the files the current code came from, not recursively, and reports a change to
any Python file in them: a helper module that is not imported yet (or failed to import) counts too.
Changes are debounced (an editor's save is often several writes) and posted to an inbox; the
loop never blocks on the watcher.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from structlog.stdlib import BoundLogger

from consumerd.errors import ConfigError

STEP_MS = 50  # a change is reported once no other came for this long
DEBOUNCE_MS = 500  # ... or at the latest this long after the first


@dataclasses.dataclass(frozen=True)
class FilesChanged:
    """Files that changed on disk (absolute paths), for the loop."""

    paths: tuple[str, ...]


def require_watchfiles() -> None:
    """Fail fast (exit 78) when `--reload` cannot work here."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigError("--reload needs the watchfiles package: pip install 'consumerd[dev]'") from None


class FileWatcher:
    def __init__(self, post: Callable[[Any], None], log: BoundLogger) -> None:
        self._post = post
        self._log = log
        self._stop: threading.Event | None = None

    def watch(self, files: Iterable[str]) -> None:
        """Watch where ``files`` are from now on (a new generation of code may come from more files)."""
        self.stop()
        directories = sorted({os.path.dirname(path) for path in files if os.path.isdir(os.path.dirname(path))})
        if not directories:
            return
        stop = self._stop = threading.Event()
        threading.Thread(target=self._run, args=(directories, stop), name="consumerd-filewatch", daemon=True).start()

    def stop(self) -> None:
        """The thread ends within STEP_MS; it posts nothing once told to stop."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def _run(self, directories: list[str], stop: threading.Event) -> None:
        import watchfiles

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its "1 change detected": we log what changed

        def python_file(_change: object, path: str) -> bool:
            return path.endswith(".py")

        try:
            for changes in watchfiles.watch(
                *directories,
                watch_filter=python_file,
                debounce=DEBOUNCE_MS,
                step=STEP_MS,
                stop_event=stop,
                recursive=False,
                raise_interrupt=False,
            ):
                if stop.is_set():
                    return
                self._post(FilesChanged(tuple(sorted({path for _, path in changes}))))
        except Exception as exc:  # noqa: BLE001 - a watcher that fails costs the reloads, never the daemon
            self._log.warning("code.watch_failed", error=f"{type(exc).__name__}: {exc}", directories=directories)

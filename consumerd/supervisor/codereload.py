"""New task code without a drain: one mechanism, two triggers.

A reload (SIGHUP, `systemctl reload`) that finds `tasks.modules` or the task code's files changed,
or, with `consumerd run --reload` (development), a Python file that changed where the code came
from, starts a new generation: a fork server that imports the code afresh beside the running one
(`Pool.begin`). The current workers go on taking messages meanwhile. Once it is ready, its tasks
replace the task table, new messages go to its workers, and the old workers finish what they run on
the old code and exit (`Pool.promote`): nothing is given back or interrupted. Code that fails to
import, or registers no task (or not `tasks.default`), rejects the reload (`reload.rejected`, with
the traceback) and the old workers run on. A reload's other settings apply once its code is ready,
or not at all.

The supervisor never imports task code: the fork server lists the files it loaded (path, mtime,
size) and a reload compares them with the disk (`changed_files`); it only stats them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import selectors
from collections.abc import Callable, Iterable
from typing import Protocol

from structlog.stdlib import BoundLogger

from consumerd.adapters.filewatch import FilesChanged, FileWatcher
from consumerd.adapters.prometheus import MetricsSink
from consumerd.config import Settings
from consumerd.errors import ConfigError, ConsumerdError
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.records import CodeFile, TaskOptions
from consumerd.pool.generation import Stage
from consumerd.pool.handles import GenerationEvent, GenerationFailed, GenerationReady, GenerationRetired
from consumerd.pool.pool import Pool, fork_server_spec
from consumerd.supervisor.reload import ReloadPlan

MAX_LISTED = 20  # changed files named in `code.changed`


class TaskTable(Protocol):
    """Who keeps the tasks the workers' code has, with their options."""

    def set_tasks(self, tasks: dict[str, TaskOptions]) -> None: ...

    def check_tasks(self, tasks: dict[str, TaskOptions], settings: Settings) -> None:
        """ConfigError if ``settings`` cannot run with these tasks (no task, an unknown default)."""


class Trigger(enum.StrEnum):
    RELOAD = "reload"  # SIGHUP
    WATCH = "watch"  # `consumerd run --reload` saw a file change


@dataclasses.dataclass(frozen=True)
class Pending:
    """New code that is loading: its generation, why, and a reload's settings to apply with it."""

    generation: int
    trigger: Trigger
    plan: ReloadPlan | None


def changed_files(files: Iterable[CodeFile], stat: Callable[[str], os.stat_result] = os.stat) -> list[str]:
    """The files whose mtime or size differ from when the code was loaded, or that are gone."""
    changed = []
    for loaded in files:
        try:
            now = stat(loaded.path)
        except OSError:
            changed.append(loaded.path)
            continue
        if (now.st_mtime_ns, now.st_size) != (loaded.mtime_ns, loaded.size):
            changed.append(loaded.path)
    return changed


class CodeReload:
    def __init__(
        self,
        pool: Pool,
        tasks: TaskTable,
        metrics: MetricsSink,
        selector: selectors.BaseSelector,
        clock: Callable[[], float],
        log: BoundLogger,
        finished: Callable[[ReloadPlan | None], None],
        watch: bool = False,
    ) -> None:
        self.pool = pool
        self.tasks = tasks  # where the task table goes: every subscription's intake
        self.metrics = metrics
        self.selector = selector
        self.clock = clock
        self.log = log
        self.finished = finished  # a reload is over: run with its plan (None: it was rejected)
        self.watch = watch  # `consumerd run --reload`
        self.settings: Settings | None = None  # what the current code runs with
        self.pending: Pending | None = None
        self.watcher: FileWatcher | None = None

    def start(self, settings: Settings, resources: contextlib.ExitStack) -> None:
        """The first generation, at start-up: its tasks are the task table; anything wrong is fatal."""
        tasks = self.pool.start()
        self.tasks.check_tasks(tasks, settings)
        self.adopt(settings, tasks)
        if self.watch:
            inbox = Inbox()
            self.watcher = FileWatcher(inbox.post, self.log)
            resources.callback(self.watcher.stop)
            self.selector.register(inbox.fd, selectors.EVENT_READ, lambda: self.files_changed(inbox.take_all()))
            self.watch_files(announce=True)

    def adopt(self, settings: Settings, tasks: dict[str, TaskOptions]) -> None:
        self.settings = settings
        self.tasks.set_tasks(tasks)
        self.metrics.known_tasks(frozenset(tasks))

    def watch_files(self, announce: bool = False) -> None:
        """Watch where the current code came from (new code may come from more places)."""
        assert self.watcher is not None
        files = [f.path for f in self.pool.code_files()]
        self.watcher.watch(files)
        where = sorted({os.path.dirname(path) for path in files})
        log = self.log.info if announce else self.log.debug
        log("code.watching", directories=where, detail="development: a changed Python file there replaces the workers")

    # -- the triggers -------------------------------------------------------------------------
    def reload(self, plan: ReloadPlan | None, now: float) -> None:
        """SIGHUP, with what the re-read config asks for (None: it was rejected, nothing changes)."""
        if plan is None:
            self.finished(None)
            return
        self.supersede(now)
        changed = ["tasks.modules"] if "tasks.modules" in plan.applied else []
        changed += changed_files(self.pool.code_files())
        if changed:
            self.begin(Trigger.RELOAD, changed, plan, now)
        else:
            self.settings = plan.settings
            self.finished(plan)

    def files_changed(self, items: list[FilesChanged]) -> None:
        """The watcher saw Python files change: new code, whatever the fingerprints say."""
        paths = sorted({path for item in items for path in item.paths})
        if paths:
            now = self.clock()
            carried = self.pending.plan if self.pending else None  # a reload's settings still wait for code
            self.supersede(now)
            self.begin(Trigger.WATCH, paths, carried, now)

    def supersede(self, now: float) -> None:
        """New code that is still loading is given up: the newest code wins."""
        if self.pending is not None:
            self.log.info("code.superseded", generation=self.pending.generation)
            self.pending = None
            self.pool.discard_starting(now)

    def begin(self, trigger: Trigger, changed: list[str], plan: ReloadPlan | None, now: float) -> None:
        settings = plan.settings if plan is not None else self.settings
        assert settings is not None
        try:
            number = self.pool.begin(fork_server_spec(settings), now)
        except (OSError, ConsumerdError) as exc:  # not even a process could be started
            self.rejected(Pending(self.pool.generation + 1, trigger, plan), f"could not start a fork server: {exc}", "")
            return
        self.pending = Pending(number, trigger, plan)
        more = {"more": len(changed) - MAX_LISTED} if len(changed) > MAX_LISTED else {}
        self.log.info("code.changed", generation=number, trigger=trigger.value, changed=changed[:MAX_LISTED], **more)

    # -- what became of it ----------------------------------------------------------------------
    def on_generation(self, event: GenerationEvent, now: float) -> None:
        """New code loaded or failed to; or a replaced generation is gone."""
        if isinstance(event, GenerationRetired):
            self.log.info("code.retired", generation=event.generation, reason=event.reason)
            return
        pending = self.pending
        if pending is None or pending.generation != event.generation:
            return  # given up already
        self.pending = None
        if isinstance(event, GenerationFailed):
            self.rejected(pending, event.error, event.traceback)
        else:
            self.ready(pending, event, now)

    def ready(self, pending: Pending, event: GenerationReady, now: float) -> None:
        settings = pending.plan.settings if pending.plan is not None else self.settings
        assert settings is not None
        try:
            self.tasks.check_tasks(event.tasks, settings)
        except ConfigError as exc:
            self.pool.discard_starting(now)
            self.rejected(pending, str(exc), "")
            return
        retired = self.pool.promote(now)
        self.adopt(settings, event.tasks)
        finishing = sum(g.busy for g in self.pool.generations(now) if g.stage is Stage.FINISHING)
        self.log.info(
            "code.ready",
            generation=event.generation,
            trigger=pending.trigger.value,
            took_s=round(event.took, 3),
            tasks=sorted(event.tasks),
            old_workers_finishing=finishing,
        )
        if self.watcher is not None:
            self.watch_files()
        if pending.plan is not None:
            self.finished(dataclasses.replace(pending.plan, generation=event.generation))
        for gone in retired:
            self.on_generation(gone, now)

    def rejected(self, pending: Pending, error: str, traceback: str) -> None:
        self.log.error(
            "reload.rejected",
            error=error,
            **({"exception": traceback} if traceback else {}),
            trigger=pending.trigger.value,
            generation=pending.generation,
            detail=f"the workers keep running the code of generation {self.pool.generation}",
        )
        if pending.plan is not None:
            self.finished(None)

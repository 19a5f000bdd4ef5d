"""Task registry: tasks register by name; modules and entry points are loaded at start-up, failing fast."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from consumerd.errors import RegistryError
from consumerd.ipc.records import TaskOptions
from consumerd.message import Message
from consumerd.policy.ratelimit import Rate
from consumerd.worker.hooks import FailureHook, SuccessHook
from consumerd.worker.payloads import Signature, signature_of

# The message in (a batch task: list[Message]), or its typed payload too (`payloads`); sync, or an
# `async def` returning a coroutine.
TaskFunc = Callable[..., object]
ENTRY_POINT_GROUP = "consumerd.tasks"
DEFAULT_BATCH_WAIT = 1.0  # seconds a batch waits to fill when @task sets batch_size only


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    func: TaskFunc
    origin: str  # "module.qualname (file:line)", for `consumerd tasks` and duplicate errors
    options: TaskOptions = TaskOptions()
    signature: Signature = Signature()  # how it is called: with the message, or a validated payload

    def call(self, message: Message) -> object:
        """Run the task for one message (an `async def` task: its coroutine); PayloadError first
        when its typed payload does not validate."""
        return self.signature.call(self.func, message)


class Registry:
    """Name -> task. Duplicates are errors at registration, unknown names at lookup."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self.start_hooks: list[Callable[[], object]] = []  # run in each worker after the fork
        self.stop_hooks: list[Callable[[], object]] = []  # run in each worker before it exits
        self.failure_hooks: list[FailureHook] = []  # run in the worker after each failed attempt
        self.success_hooks: list[SuccessHook] = []  # run in the worker after each message done

    def register(self, name: str, func: TaskFunc, options: TaskOptions = TaskOptions()) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"task name must be a non-empty string, got {name!r} for {_origin(func)}")
        existing = self._tasks.get(name)
        if existing is not None and existing.func is not func:
            raise RegistryError(f"task {name!r} is registered twice: {existing.origin} and {_origin(func)}")
        if problems := options.problems():
            raise RegistryError(f"@task({name!r}) at {_origin(func)}: {'; '.join(problems)}")
        options = dataclasses.replace(options, is_async=inspect.iscoroutinefunction(func))  # from the code, never declared
        signature = signature_of(func, batch=options.batch_size is not None, where=f"@task({name!r}) at {_origin(func)}")
        self._tasks[name] = TaskSpec(name, func, _origin(func), options, signature)

    def get(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def is_async(self, name: str) -> bool:
        spec = self._tasks.get(name)
        return spec is not None and spec.options.is_async

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def specs(self) -> list[TaskSpec]:
        return sorted(self._tasks.values(), key=lambda spec: spec.name)

    def clear(self) -> None:
        self._tasks.clear()
        self.start_hooks.clear()
        self.stop_hooks.clear()
        self.failure_hooks.clear()
        self.success_hooks.clear()

    def task_hooks(self) -> tuple[list[SuccessHook], list[FailureHook]]:
        return self.success_hooks, self.failure_hooks


# The process-wide registry the @task decorator fills when task modules are imported.
REGISTRY = Registry()


def task(
    name: str,
    *,
    timeout: float | None = None,
    concurrency: int | None = None,
    min_backoff: float | None = None,
    max_backoff: float | None = None,
    max_attempts: int | None = None,
    batch_size: int | None = None,
    batch_wait: float | None = None,
    rate_limit: str | None = None,
) -> Callable[[TaskFunc], TaskFunc]:
    """Register ``func`` as the task for messages whose route attribute is ``name``.

    Return normally for success; raise for failure (the message comes back later). The options
    override their global settings for this task only: ``timeout`` (workers.task_timeout),
    ``concurrency`` (at most this many of it at once on this host), ``min_backoff``/``max_backoff``
    (retry.*), ``max_attempts`` (dead_letter.max_attempts), ``rate_limit`` ("20/s", "600/m", "100/h":
    how many of it may start per second, minute or hour; `[tasks] rate_limits` overrides it).

    An ``async def`` task runs on its worker's event loop, up to ``workers.async_concurrency`` at once
    per worker. With ``batch_size`` the task gets ``list[Message]``, up to that many, after waiting at
    most ``batch_wait`` seconds (default 1.0) to fill the batch; see `consumerd.BatchResult`.
    """

    def decorate(func: TaskFunc) -> TaskFunc:
        if not callable(func):
            raise RegistryError(f"@task({name!r}) must decorate a function, got {func!r}")
        wait = batch_wait if batch_wait is not None or batch_size is None else DEFAULT_BATCH_WAIT
        per_second = _per_second(rate_limit, f"@task({name!r}) at {_origin(func)}")
        options = TaskOptions(timeout, concurrency, min_backoff, max_backoff, max_attempts, batch_size, wait, rate_limit=per_second)
        REGISTRY.register(name, func, options)
        return func

    return decorate


def _per_second(rate_limit: str | None, where: str) -> float | None:
    """`@task(rate_limit="20/s")` as the messages per second `TaskOptions` carries; a RegistryError when it does not parse."""
    if rate_limit is None:
        return None
    try:
        return Rate.parse(rate_limit).per_second
    except ValueError as exc:
        raise RegistryError(f"{where}: rate_limit {exc}") from None


def on_worker_start(func: Callable[[], object]) -> Callable[[], object]:
    """Run ``func()`` in every worker right after it is forked, before its first task (open a pool,
    seed a generator). If it raises, the daemon stops with exit 78 and the traceback is logged."""
    REGISTRY.start_hooks.append(func)
    return func


def on_worker_stop(func: Callable[[], object]) -> Callable[[], object]:
    """Run ``func()`` in every worker before it exits normally (close what the start hook opened)."""
    REGISTRY.stop_hooks.append(func)
    return func


def on_task_failure(func: FailureHook) -> FailureHook:
    """Run ``func(failure)`` in the worker after each failed attempt at a message, with a
    `consumerd.TaskFailure` (task, message, exception, attempt, fate, duration): report it to an error
    tracker. It cannot change what happens to the message; if it raises, `hook.failed` is logged."""
    return _task_hook(func, REGISTRY.failure_hooks, "on_task_failure")


def on_task_success(func: SuccessHook) -> SuccessHook:
    """Run ``func(success)`` in the worker after each message a task completed, with a
    `consumerd.TaskSuccess` (task, message, result, attempt, duration). If it raises, `hook.failed`
    is logged and the message is acked all the same."""
    return _task_hook(func, REGISTRY.success_hooks, "on_task_success")


def _task_hook(func: Any, hooks: list[Any], decorator: str) -> Any:
    if not callable(func) or inspect.iscoroutinefunction(func):
        raise RegistryError(f"@{decorator} must decorate a plain (not async) function, got {func!r}")
    hooks.append(func)
    return func


def load_task_modules(modules: Iterable[str], *, entry_points: bool = True) -> Registry:
    """Import the configured modules and the ``consumerd.tasks`` entry points; return the registry."""
    for module in modules:
        _import(module, where="tasks.modules")
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _import(ep.value.split(":")[0], where=f"entry point {ep.name!r} ({ENTRY_POINT_GROUP})")
    return REGISTRY


def _import(module: str, *, where: str) -> None:
    try:
        importlib.import_module(module)
    except RegistryError:
        raise
    except ModuleNotFoundError as exc:
        raise RegistryError(f"{where}: cannot import {module!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error in user code at import is a config error
        raise RegistryError(f"{where}: importing {module!r} failed: {type(exc).__name__}: {exc}") from None


def _origin(func: TaskFunc) -> str:
    module = getattr(func, "__module__", "?")
    qualname = getattr(func, "__qualname__", repr(func))
    try:
        line = inspect.getsourcelines(func)[1]
        location = f" ({inspect.getsourcefile(func)}:{line})"
    except (OSError, TypeError):
        location = ""
    return f"{module}.{qualname}{location}"

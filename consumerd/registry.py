"""Task registry: tasks register by name; modules and entry points are loaded at start-up, failing fast."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable

from .errors import RegistryError
from .message import Message

TaskFunc = Callable[[Message], object]
ENTRY_POINT_GROUP = "consumerd.tasks"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    func: TaskFunc
    origin: str  # "module.qualname (file:line)", for `consumerd tasks` and duplicate errors


class Registry:
    """Name -> task. Duplicates are errors at registration, unknown names at lookup."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    def register(self, name: str, func: TaskFunc) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"task name must be a non-empty string, got {name!r} for {_origin(func)}")
        existing = self._tasks.get(name)
        if existing is not None and existing.func is not func:
            raise RegistryError(f"task {name!r} is registered twice: {existing.origin} and {_origin(func)}")
        self._tasks[name] = TaskSpec(name, func, _origin(func))

    def get(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def specs(self) -> list[TaskSpec]:
        return sorted(self._tasks.values(), key=lambda spec: spec.name)

    def clear(self) -> None:
        self._tasks.clear()


# The process-wide registry the @task decorator fills when task modules are imported.
REGISTRY = Registry()


def task(name: str) -> Callable[[TaskFunc], TaskFunc]:
    """Register ``func`` as the task for messages whose route attribute is ``name``.

    Return normally for success; raise for failure (the message comes back later).
    """

    def decorate(func: TaskFunc) -> TaskFunc:
        if not callable(func):
            raise RegistryError(f"@task({name!r}) must decorate a function, got {func!r}")
        REGISTRY.register(name, func)
        return func

    return decorate


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

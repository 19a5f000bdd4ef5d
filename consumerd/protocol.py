"""Immutable records that cross process boundaries between the supervisor, fork server and workers."""

from __future__ import annotations

import dataclasses

from .message import Message


@dataclasses.dataclass(frozen=True, slots=True)
class ForkServerSpec:
    """What the fork server needs to preload: the same imports and logging as the supervisor."""

    sys_path: tuple[str, ...]
    modules: tuple[str, ...]
    log_format: str
    log_level: str
    max_tasks_per_child: int


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    seq: int  # unique per dispatch, so a late or stray result can never match the wrong message
    task: str
    message: Message


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    seq: int
    outcome: str  # delivery.SUCCESS, ERROR, RETRY or REJECT
    duration: float  # seconds the task function ran, measured in the worker
    error: str = ""  # "ExceptionType: text" when not a success
    retry_after: float | None = None  # with RETRY: the delay the task asked for

    @property
    def ok(self) -> bool:
        return self.outcome == "success"

"""[workers], [tasks] and [tracing]: the pool, the task modules and what runs in workers."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from consumerd.config.section import Section


class WorkerSettings(Section):
    concurrency: int = Field(8, ge=1, le=1024)
    max_tasks_per_child: int = Field(0, ge=0)
    task_timeout: float = Field(600, gt=0, le=86400)
    async_concurrency: int = Field(100, ge=1, le=10000)  # coroutines at once per worker (async def tasks)
    # Variables for task code: the workers get the daemon's environment without its secrets (see
    # `sandbox`), plus these (e.g. GOOGLE_APPLICATION_CREDENTIALS for a key of the tasks' own).
    environment: dict[str, str] = Field(default_factory=dict)
    # Make $CREDENTIALS_DIRECTORY (LoadCredential=) unreadable for task code with Landlock.
    hide_credentials: bool = True

    @field_validator("environment")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or "\0" in text:
                raise ValueError(f"workers.environment: {name!r} is not a valid variable name (or its value has a NUL)")
        return value


class TaskSettings(Section):
    modules: list[str] = Field(default_factory=list)
    route_attribute: str = Field("task", min_length=1)
    default: str = ""
    idempotency_attribute: str = ""

    @field_validator("modules")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        for module in modules:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", module):
                raise ValueError(f"{module!r} is not a Python module name")
        return modules


class TracingSettings(Section):
    enabled: bool = False  # needs the extra: pip install 'consumerd[otel]'; exporters from OTEL_* variables

"""[workers], [tasks] and [tracing]: the pool, the task modules and what runs in workers."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from consumerd.config.section import Section


class WorkerSettings(Section):
    concurrency: int = Field(
        8,
        ge=1,
        le=1024,
        description="Tasks running at once, each in a worker process of its own. For CPU-bound tasks: the number of cores.",
    )
    max_tasks_per_child: int = Field(
        0, ge=0, description="Tasks a worker runs before it is replaced: 0 = reuse workers forever, 1 = a fresh process per message."
    )
    task_timeout: float = Field(
        600,
        gt=0,
        le=86400,
        description="Seconds a task may run (its own `@task(timeout=...)` overrides this). Past it the task is ended: "
        "TaskCancelled inside it, SIGKILL to its process group 5 s later, and its message is retried.",
    )
    async_concurrency: int = Field(100, ge=1, le=10000, description="Coroutines one worker runs at once for `async def` tasks.")
    # Variables for task code: the workers get the daemon's environment without its secrets (see
    # `sandbox`), plus these (e.g. GOOGLE_APPLICATION_CREDENTIALS for a key of the tasks' own).
    environment: dict[str, str] = Field(
        default_factory=dict,
        description="Variables for task code, on top of the daemon's environment without its secrets "
        "(e.g. GOOGLE_APPLICATION_CREDENTIALS for a key of the tasks' own).",
    )
    # Make $CREDENTIALS_DIRECTORY (LoadCredential=) unreadable for task code with Landlock.
    hide_credentials: bool = Field(
        True, description="Make $CREDENTIALS_DIRECTORY (LoadCredential=) unreadable for task code, with Landlock (Linux >= 5.13)."
    )

    @field_validator("environment")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or "\0" in text:
                raise ValueError(f"workers.environment: {name!r} is not a valid variable name (or its value has a NUL)")
        return value


class TaskSettings(Section):
    modules: list[str] = Field(
        default_factory=list,
        description="Modules imported at start-up (by the fork server, never by the supervisor) whose @task functions "
        "register. Packages can also name modules in the entry point group consumerd.tasks.",
    )
    route_attribute: str = Field("task", min_length=1, description="The message attribute that names the task to run.")
    default: str = Field("", description="The task for messages without that attribute. Empty: such messages are rejects.")
    idempotency_attribute: str = Field(
        "", description="`msg.idempotency_key` is this attribute's value when the message has it, else the message id."
    )

    @field_validator("modules")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        for module in modules:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", module):
                raise ValueError(f"{module!r} is not a Python module name")
        return modules


class TracingSettings(Section):
    enabled: bool = Field(
        False,
        description="OpenTelemetry spans around each task, continuing the publisher's trace. Needs the extra: "
        "pip install 'consumerd[otel]'; the exporter comes from the OTEL_* variables (OTEL_TRACES_EXPORTER).",
    )

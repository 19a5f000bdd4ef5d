"""[workers], [tasks] and [tracing]: the pool, the task modules and what runs in workers."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator

from consumerd.config.ratelimit import rate_text
from consumerd.config.section import Section

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
MIN_MEMORY_LIMIT = 64 * 2**20  # a worker (Python, consumerd and the task modules) maps ~40 MiB of data before any task


def byte_size(value: object) -> object:
    """Bytes from an integer or a size such as "512MiB", "200MB", "1.5GiB"; anything else is an error.

    A bare "M" or "K" is refused: it means 10**6 to some tools and 2**20 to others (systemd).
    """
    if isinstance(value, bool):
        raise ValueError('a size is a number of bytes or text such as "512MiB", not true or false')
    if not isinstance(value, str):
        return value  # an integer, checked as one; a float fails as "not a valid integer"
    match = _SIZE.fullmatch(value)
    if match is None or match.group(2).lower() not in _UNITS or (not match.group(2) and "." in match.group(1)):
        raise ValueError(f"{value!r} is not a size: use bytes (an integer) or a number and one of B, kB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])


ByteSize = Annotated[int, BeforeValidator(byte_size)]  # bytes; the file and the environment may say "512MiB"


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
    max_memory_per_child: ByteSize = Field(
        0,
        ge=0,
        description="A worker whose resident memory (RSS) is above this after a task is replaced once the tasks it holds "
        'have finished: none is interrupted. Bytes, or a size such as "512MiB" or "2GB"; 0 = off. For tasks that leak.',
    )
    memory_limit: ByteSize = Field(
        0,
        ge=0,
        description="A hard cap on each worker's memory (RLIMIT_DATA: its heap and private mappings, set after fork), so a "
        "task that allocates past it gets a MemoryError, an ordinary failure retried with backoff, instead of the host's "
        'OOM killer. Bytes or a size ("1GiB"); 0 = off, else at least 64 MiB. A worker left within a tenth of it '
        "after a task is replaced.",
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

    @field_validator("memory_limit")
    @classmethod
    def _room_for_a_worker(cls, value: int) -> int:
        if 0 < value < MIN_MEMORY_LIMIT:
            raise ValueError(f"{value} bytes leaves no room for a worker: 0 (off) or at least 64 MiB ({MIN_MEMORY_LIMIT})")
        return value

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
    rate_limits: dict[str, str] = Field(
        default_factory=dict,
        description='Task name -> how many of its messages may start per second, minute or hour ("20/s", "1.5/s", '
        '"600/m", "100/h"), over any `@task(rate_limit=...)`: e.g. {send = "20/s"}. Per host, or across the fleet with '
        "`[rate_limit] redis`. Messages waiting for their turn keep their leases and take no worker; other tasks run.",
    )

    @field_validator("modules")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        for module in modules:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", module):
                raise ValueError(f"{module!r} is not a Python module name")
        return modules

    @field_validator("rate_limits")
    @classmethod
    def _rates(cls, limits: dict[str, str]) -> dict[str, str]:
        for task, text in limits.items():
            if not task:
                raise ValueError("a task name must not be empty")
            try:
                rate_text(text)
            except ValueError as exc:
                raise ValueError(f"{task}: {exc}") from None
        return limits


class TracingSettings(Section):
    enabled: bool = Field(
        False,
        description="OpenTelemetry spans around each task, continuing the publisher's trace. Needs the extra: "
        "pip install 'consumerd[otel]'; the exporter comes from the OTEL_* variables (OTEL_TRACES_EXPORTER).",
    )

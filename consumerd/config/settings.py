"""The whole settings model: every section, read from the TOML file and CONSUMERD_* variables."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumerd.config.delivery import DeadLetterSettings, FlowSettings, LeaseSettings, RetrySettings, ShutdownSettings
from consumerd.config.operations import ControlSettings, LoggingSettings, MetricsSettings
from consumerd.config.pubsub import PubSubSettings
from consumerd.config.workers import TaskSettings, TracingSettings, WorkerSettings
from consumerd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/consumerd.toml")
ENV_PREFIX = "CONSUMERD_"

file_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("file_data")


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return file_data.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(file_data.get({}))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    pubsub: PubSubSettings = PubSubSettings()
    workers: WorkerSettings = WorkerSettings()
    leases: LeaseSettings = LeaseSettings()
    retry: RetrySettings = RetrySettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    flow: FlowSettings = FlowSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    tasks: TaskSettings = TaskSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    control: ControlSettings = ControlSettings()
    tracing: TracingSettings = TracingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: explicit arguments, then the environment, then the file.
        return (init_settings, env_settings, _FileSource(settings_cls))

    def require_subscription(self, source: str) -> None:
        """`run` needs a subscription and a project; `publish` and `setup` do not."""
        if not self.pubsub.subscription:
            raise ConfigError(f"{source}: pubsub.subscription: required (a subscription name)")
        if not self.pubsub.project:
            raise ConfigError(
                f"{source}: pubsub.project: required (set it, GOOGLE_CLOUD_PROJECT, or use a full projects/P/subscriptions/S subscription)"
            )

    def check_task_names(self, names: frozenset[str] | set[str]) -> None:
        """What `run` and `check-config` both refuse: no tasks at all, or a default that is not one."""
        if not names:
            raise ConfigError(f"tasks.modules: no tasks registered by {list(self.tasks.modules)} or entry points")
        if self.tasks.default and self.tasks.default not in names:
            raise ConfigError(f"tasks.default: no task named {self.tasks.default!r} (known: {', '.join(sorted(names))})")

    def masked(self) -> dict[str, Any]:
        """The effective settings for display: secret-bearing values are masked."""
        data = self.model_dump(mode="json")
        if data["pubsub"]["credentials_file"]:
            path = self.pubsub.credentials_path()
            readable = path is not None and os.access(path, os.R_OK)
            data["pubsub"]["credentials_file"] = f"{path} (contents not shown; readable={readable})"
        return data

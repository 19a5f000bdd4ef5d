"""The whole settings model: every section, read from the TOML file and CONSUMERD_* variables."""

from __future__ import annotations

import contextvars
import dataclasses
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumerd.config.delivery import DeadLetterSettings, FlowSettings, LeaseSettings, RetrySettings, ShutdownSettings
from consumerd.config.operations import ControlSettings, LoggingSettings, MetricsSettings
from consumerd.config.publish import PublishSettings
from consumerd.config.pubsub import PubSubSettings
from consumerd.config.ratelimit import RateLimitSettings, masked_url
from consumerd.config.subscriptions import SubscriptionSettings, check_unique
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


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """One subscription the daemon serves."""

    path: str  # projects/P/subscriptions/S
    weight: int
    max_concurrency: int  # 0: no cap beyond the pool
    settings: Settings  # the daemon's settings as they apply to this subscription

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


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
    publish: PublishSettings = PublishSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    subscriptions: list[SubscriptionSettings] = Field(
        default_factory=list,
        description="Several subscriptions served by one worker pool, each with its weight and overrides "
        "([[subscriptions]] tables). Instead of pubsub.subscription, never with it.",
    )

    @model_validator(mode="after")
    def _one_way_to_name_subscriptions(self) -> Settings:
        if self.subscriptions and self.pubsub.subscription:
            raise ValueError("set pubsub.subscription (one subscription) or [[subscriptions]] (several), not both")
        check_unique(self.subscriptions, self.pubsub.project)
        self.streams()  # every subscription's overrides must make valid sections
        return self

    def streams(self) -> list[StreamSettings]:
        """One entry per subscription served: its path, weight, concurrency cap, and its settings
        (these settings with its overrides applied, and only its subscription)."""
        if not self.subscriptions:
            return [StreamSettings(self.pubsub.subscription_path, 1, 0, self)]
        streams = []
        for entry in self.subscriptions:
            pubsub = PubSubSettings.model_validate({**self.pubsub.model_dump(), "subscription": entry.name})
            update: dict[str, Any] = {"pubsub": pubsub, "subscriptions": []}
            for name, values in entry.overrides().items():
                section = getattr(self, name)
                try:
                    update[name] = type(section).model_validate({**section.model_dump(), **values})
                except ValidationError as exc:
                    problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                    raise ValueError(f"subscription {entry.name!r}: its [{name}] overrides: {problems}") from None
            streams.append(StreamSettings(pubsub.subscription_path, entry.weight, entry.max_concurrency, self.model_copy(update=update)))
        return streams

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
        if not self.pubsub.subscription and not self.subscriptions:
            raise ConfigError(f"{source}: pubsub.subscription: required (a subscription name, or [[subscriptions]])")
        if not all(stream.settings.pubsub.project for stream in self.streams()):
            raise ConfigError(
                f"{source}: pubsub.project: required (set it, GOOGLE_CLOUD_PROJECT, or use a full projects/P/subscriptions/S subscription)"
            )

    def check_task_names(self, names: frozenset[str] | set[str]) -> None:
        """What `run` and `check-config` both refuse: no tasks at all, or a default that is not one."""
        if not names:
            raise ConfigError(f"tasks.modules: no tasks registered by {list(self.tasks.modules)} or entry points")
        if self.tasks.default and self.tasks.default not in names:
            raise ConfigError(f"tasks.default: no task named {self.tasks.default!r} (known: {', '.join(sorted(names))})")
        if unknown := sorted(set(self.tasks.rate_limits) - set(names)):
            raise ConfigError(f"tasks.rate_limits: no task named {', '.join(map(repr, unknown))} (known: {', '.join(sorted(names))})")

    def masked(self) -> dict[str, Any]:
        """The effective settings for display: secret-bearing values are masked."""
        data = self.model_dump(mode="json")
        if data["pubsub"]["credentials_file"]:
            path = self.pubsub.credentials_path()
            readable = path is not None and os.access(path, os.R_OK)
            data["pubsub"]["credentials_file"] = f"{path} (contents not shown; readable={readable})"
        data["rate_limit"]["redis"] = masked_url(self.rate_limit.redis)
        return data

"""The settings model: a TOML file plus CONSUMERD_<SECTION>__<KEY> environment overrides.

Environment wins over the file; unknown keys anywhere are errors so typos never pass silently.
Every failure becomes one ConfigError line naming the key, where it came from and what was wrong.
"""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/consumerd.toml")
ENV_PREFIX = "CONSUMERD_"
_SUBSCRIPTION_PATH = re.compile(r"^projects/(?P<project>[^/]+)/subscriptions/(?P<name>[^/]+)$")
_SHORT_NAME = re.compile(r"^[A-Za-z][-A-Za-z0-9_.~+%]{2,254}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PubSubSettings(_Section):
    project: str = ""
    subscription: str = ""
    emulator_host: str = ""
    # HOST:PORT of the service over TLS: the global endpoint, a regional one
    # (europe-west1-pubsub.googleapis.com:443) or a Private Service Connect name.
    endpoint: str = "pubsub.googleapis.com:443"
    credentials_file: str = ""
    startup_timeout: float = Field(60.0, gt=0, le=3600)
    pull_timeout: float = Field(30.0, ge=2, le=60)  # an empty long poll's length; also how soon a hung Pub/Sub shows

    @model_validator(mode="after")
    def _fill_from_standard_env(self) -> PubSubSettings:
        # The Google libraries' own variables are the fallback, as users of them expect.
        if not self.project:
            object.__setattr__(self, "project", os.environ.get("GOOGLE_CLOUD_PROJECT", ""))
        if not self.emulator_host:
            object.__setattr__(self, "emulator_host", os.environ.get("PUBSUB_EMULATOR_HOST", ""))
        match = _SUBSCRIPTION_PATH.match(self.subscription)
        if match and not self.project:
            object.__setattr__(self, "project", match["project"])
        return self

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}:[0-9]{1,5}", value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise ValueError("must be HOST:PORT, e.g. pubsub.googleapis.com:443 or europe-west1-pubsub.googleapis.com:443")
        return value

    @field_validator("subscription")
    @classmethod
    def _subscription_form(cls, value: str) -> str:
        if value and not (_SUBSCRIPTION_PATH.match(value) or _SHORT_NAME.match(value)):
            raise ValueError(
                "must be a subscription name (3-255 characters, starting with a letter) or projects/PROJECT/subscriptions/NAME"
            )
        return value

    @field_validator("emulator_host")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.match(r"^[^:\s]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", value):
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8085")
        return value

    @property
    def subscription_path(self) -> str:
        if _SUBSCRIPTION_PATH.match(self.subscription):
            return self.subscription
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    def topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def credentials_path(self) -> Path | None:
        """The service-account key file, resolved against systemd's $CREDENTIALS_DIRECTORY."""
        if not self.credentials_file:
            return None
        path = Path(self.credentials_file)
        credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and credentials_dir:
            path = Path(credentials_dir) / path
        return path


class WorkerSettings(_Section):
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


class LeaseSettings(_Section):
    ack_deadline: int = Field(60, ge=10, le=600)
    adaptive: bool = True
    min_ack_deadline: int = Field(10, ge=10, le=600)
    max_ack_deadline: int = Field(600, ge=10, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> LeaseSettings:
        if self.min_ack_deadline > self.max_ack_deadline:
            raise ValueError("min_ack_deadline must not exceed max_ack_deadline")
        return self


class RetrySettings(_Section):
    min_backoff: float = Field(1.0, ge=0, le=600)
    max_backoff: float = Field(600.0, ge=0, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> RetrySettings:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff must not exceed max_backoff")
        return self


class DeadLetterSettings(_Section):
    topic: str = ""
    max_attempts: int = Field(0, ge=0, le=1000)

    @model_validator(mode="after")
    def _needs_topic(self) -> DeadLetterSettings:
        if self.max_attempts and not self.topic:
            raise ValueError("max_attempts needs a topic to forward to")
        return self


class FlowSettings(_Section):
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=0)
    max_message_bytes: int = Field(0, ge=0)


class ShutdownSettings(_Section):
    drain_timeout: float = Field(60, ge=0, le=86400)


class MetricsSettings(_Section):
    listen: str = "127.0.0.1:9464"  # HOST:PORT for /metrics, /healthz, /readyz; "" = off; port 0 = any free one

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.match(r"^[^:\s\[\]]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", value):
            raise ValueError('must be HOST:PORT (e.g. 127.0.0.1:9464), or "" to turn metrics off')
        if value and int(value.rpartition(":")[2]) > 65535:
            raise ValueError("port must be 0..65535")
        return value


class ControlSettings(_Section):
    socket: str = ""  # "" = $RUNTIME_DIRECTORY/control.sock under systemd, else no control socket
    group: str = ""  # a group whose members may read `status` (the socket becomes 0660)

    def socket_path(self) -> str:
        if self.socket:
            return self.socket
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return f"{runtime}/control.sock" if runtime else ""


class TracingSettings(_Section):
    enabled: bool = False  # needs the extra: pip install 'consumerd[otel]'; exporters from OTEL_* variables


class TaskSettings(_Section):
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


class LoggingSettings(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # The least the Google client libraries log at: their debug output holds payloads.
    google_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("level", "format", "google_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


# The parsed TOML document for the settings being built; a context variable so that
# pydantic-settings' class-level source hook can see a per-call file.
_file_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("file_data")


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_data.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get({}))


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


def config_path(cli_value: str | None) -> tuple[Path, bool]:
    """The path to read and whether the operator named it (the default file may be absent for some commands)."""
    if cli_value:
        return Path(cli_value), True
    from_env = os.environ.get("CONSUMERD_CONFIG")
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(path: Path | None) -> Settings:
    """Read ``path`` (None: environment only) and validate; raise ConfigError with one line per problem."""
    data = _read_toml(path) if path is not None else {}
    _reject_unknown_env_sections()
    source = str(path) if path is not None else "environment"
    token = _file_data.set(data)
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc}{_cause(exc)}; list values are JSON, e.g. '[\"myapp.tasks\"]'") from None
    finally:
        _file_data.reset(token)


def _reject_unknown_env_sections() -> None:
    # pydantic-settings ignores CONSUMERD_* variables whose section it does not know: catch the typo.
    sections = set(Settings.model_fields)
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == "CONSUMERD_CONFIG":
            continue
        section = name[len(ENV_PREFIX) :].split("__")[0].lower()
        if section not in sections or "__" not in name:
            raise ConfigError(
                f"environment {name}: unknown setting (expected CONSUMERD_<SECTION>__<KEY> with "
                f"SECTION one of {', '.join(sorted(sections))})"
            )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config PATH or CONSUMERD_CONFIG)") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file is not readable by uid {os.getuid()}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None


def _describe(exc: pydantic.ValidationError, file_source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
        where = f"environment {env_name}" if env_name in os.environ else file_source
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: {key}: unknown key")
        else:
            problems.append(f"{where}: {key}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(problems)


def _cause(exc: BaseException) -> str:
    return f" ({exc.__cause__})" if exc.__cause__ else ""


# What SIGHUP cannot change in a running daemon: the subscription and clients, what the fork server
# preloaded, and the log renderer. Changing them needs a restart.
FIXED_ON_RELOAD = (
    "pubsub",
    "tasks",
    "metrics",
    "control",
    "tracing",
    "workers.max_tasks_per_child",
    "workers.environment",
    "logging.format",
)


def reload_plan(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """Settings to run with after a reload, the keys applied, and the keys refused (kept as they were)."""
    old_data, new_data = old.model_dump(), new.model_dump()
    applied, refused = [], []
    merged = {section: dict(values) for section, values in old_data.items()}
    for section, values in new_data.items():
        for key, value in values.items():
            if old_data[section][key] == value:
                continue
            name = f"{section}.{key}"
            if section in FIXED_ON_RELOAD or name in FIXED_ON_RELOAD:
                refused.append(name)
            else:
                merged[section][key] = value
                applied.append(name)
    return Settings.model_validate(merged), applied, refused

"""The settings model: a TOML file plus CONSUMERD_<SECTION>__<KEY> environment overrides.

Environment wins over the file; unknown keys anywhere are errors so typos never pass silently.
Every failure becomes one ConfigError line naming the key, where it came from and what was wrong.
"""

from consumerd.config.delivery import DeadLetterSettings, FlowSettings, LeaseSettings, RetrySettings, ShutdownSettings
from consumerd.config.loading import config_path, load_settings
from consumerd.config.operations import ControlSettings, LoggingSettings, MetricsSettings
from consumerd.config.pubsub import PubSubSettings
from consumerd.config.reload import FIXED_ON_RELOAD, reload_plan
from consumerd.config.settings import DEFAULT_CONFIG_PATH, ENV_PREFIX, Settings
from consumerd.config.workers import TaskSettings, TracingSettings, WorkerSettings

__all__ = [
    "ControlSettings",
    "DEFAULT_CONFIG_PATH",
    "DeadLetterSettings",
    "ENV_PREFIX",
    "FIXED_ON_RELOAD",
    "FlowSettings",
    "LeaseSettings",
    "LoggingSettings",
    "MetricsSettings",
    "PubSubSettings",
    "RetrySettings",
    "Settings",
    "ShutdownSettings",
    "TaskSettings",
    "TracingSettings",
    "WorkerSettings",
    "config_path",
    "load_settings",
    "reload_plan",
]

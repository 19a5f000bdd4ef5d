"""What a reload (SIGHUP) may change in a running daemon, and what it must refuse."""

from __future__ import annotations

from typing import Any

import pydantic

from consumerd.config.settings import Settings
from consumerd.errors import ConfigError

# What SIGHUP cannot change in a running daemon: the subscription and clients (the dead-letter
# publisher among them), how messages find their task, what the fork server set up before forking
# (environment, hidden credentials), and the log renderer. Changing them needs a restart.
# `tasks.modules` may change: new task code starts a new generation of workers (`codereload`).
FIXED_ON_RELOAD = (
    "pubsub",
    "tasks.route_attribute",
    "tasks.default",
    "tasks.idempotency_attribute",
    "metrics",
    "control",
    "tracing",
    "workers.max_tasks_per_child",
    "workers.environment",
    "workers.hide_credentials",
    "workers.max_memory_per_child",  # both travel in the fork server's spec: a new fork server would apply them
    "workers.memory_limit",
    "dead_letter.topic",
    "publish",
    "subscriptions",
    "logging.format",
    "rate_limit.redis",  # the limiter's connection: `hosts` and the limits themselves may change
    "rate_limit.key_prefix",
    "rate_limit.timeout",
)


def reload_plan(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """Settings to run with after a reload, the keys applied, and the keys refused (kept as they were)."""
    old_data, new_data = old.model_dump(), new.model_dump()
    applied: list[str] = []
    refused: list[str] = []
    merged: dict[str, Any] = {section: dict(values) if isinstance(values, dict) else values for section, values in old_data.items()}
    for section, values in new_data.items():
        if not isinstance(values, dict):  # not a table of keys (a list of tables): the section is one value
            if old_data[section] != values:
                (refused if section in FIXED_ON_RELOAD else applied).append(section)
                merged[section] = old_data[section] if section in FIXED_ON_RELOAD else values
            continue
        for key, value in values.items():
            if old_data[section][key] == value:
                continue
            name = f"{section}.{key}"
            if section in FIXED_ON_RELOAD or name in FIXED_ON_RELOAD:
                refused.append(name)
            else:
                merged[section][key] = value
                applied.append(name)
    try:
        return Settings.model_validate(merged), applied, refused
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"the keys a reload may apply ({', '.join(applied)}) do not fit those it must keep ({', '.join(refused)}): {problems}"
        ) from None

"""What a reload (SIGHUP) may change in a running daemon, and what it must refuse."""

from __future__ import annotations

import pydantic

from consumerd.config.settings import Settings
from consumerd.errors import ConfigError

# What SIGHUP cannot change in a running daemon: the subscription and clients (the dead-letter
# publisher among them), what the fork server set up before forking (task modules, environment,
# hidden credentials), and the log renderer. Changing them needs a restart.
FIXED_ON_RELOAD = (
    "pubsub",
    "tasks",
    "metrics",
    "control",
    "tracing",
    "workers.max_tasks_per_child",
    "workers.environment",
    "workers.hide_credentials",
    "dead_letter.topic",
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
    try:
        return Settings.model_validate(merged), applied, refused
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"the keys a reload may apply ({', '.join(applied)}) do not fit those it must keep ({', '.join(refused)}): {problems}"
        ) from None

"""Reading the settings: which file, the TOML parse, and one ConfigError line per problem."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pydantic
from pydantic_settings.exceptions import SettingsError

from consumerd.config.ratelimit import masked_url
from consumerd.config.settings import DEFAULT_CONFIG_PATH, ENV_PREFIX, Settings, file_data
from consumerd.errors import ConfigError


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
    token = file_data.set(data)
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc}{_cause(exc)}; list values are JSON, e.g. '[\"myapp.tasks\"]'") from None
    finally:
        file_data.reset(token)


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
        elif not key:  # a rule across sections: its message names the keys; the input is the whole file
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        else:
            got = masked_url(error["input"]) if key == "rate_limit.redis" and isinstance(error.get("input"), str) else error.get("input")
            problems.append(f"{where}: {key}: {error['msg']} (got {got!r})")  # a Redis URL may hold a password
    return "; ".join(problems)


def _cause(exc: BaseException) -> str:
    return f" ({exc.__cause__})" if exc.__cause__ else ""

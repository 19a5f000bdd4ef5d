"""SIGHUP: re-read the config file (and environment), keep what may change at run time, refuse the rest.

A config that does not load, or asks for more workers than the descriptor limit holds, is rejected
whole and the daemon keeps running with the settings it had. What is accepted is a `ReloadPlan`,
applied at once or, when the task code changed, once the new code is ready (`codereload`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from structlog.stdlib import BoundLogger

from consumerd.config import Settings, load_settings, reload_plan
from consumerd.errors import ConfigError
from consumerd.logsetup import configure_logging


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload will run with, and which keys it applies and refuses."""

    settings: Settings
    applied: tuple[str, ...]
    refused: tuple[str, ...]
    generation: int | None = None  # the new generation of task code it started, if the code changed


class Reloader:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path  # None: started without a file, nothing to re-read

    @property
    def enabled(self) -> bool:
        return self.config_path is not None

    def reload(self, current: Settings, max_concurrency: int, log: BoundLogger) -> ReloadPlan | None:
        """What the config asks for now, or None when it is rejected (`reload.rejected`)."""
        assert self.config_path is not None
        try:
            new = load_settings(self.config_path)
            new.require_subscription(str(self.config_path))
            if new.workers.concurrency > max_concurrency:
                raise ConfigError(
                    f"workers.concurrency = {new.workers.concurrency} exceeds {max_concurrency}, the most the file descriptor limit holds"
                )
            merged, applied, refused = reload_plan(current, new)
        except ConfigError as exc:
            log.error("reload.rejected", error=str(exc), detail="still running with the previous config")
            return None
        for key in refused:
            log.warning("reload.refused", key=key, detail="cannot change while running: restart to apply")
        return ReloadPlan(merged, tuple(applied), tuple(refused))

    def finish(self, plan: ReloadPlan, log: BoundLogger) -> Settings:
        """The reload is done: its log levels apply now, `reload.done` says what changed."""
        merged = plan.settings
        configure_logging(merged.logging.format, merged.logging.level, google_level=merged.logging.google_level)
        code = {} if plan.generation is None else {"generation": plan.generation}
        log.info("reload.done", applied=list(plan.applied), refused=list(plan.refused), concurrency=merged.workers.concurrency, **code)
        return merged

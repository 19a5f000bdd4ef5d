"""[logging], [metrics] and [control]: how operators watch and steer the daemon."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from consumerd.config.section import Section


class LoggingSettings(Section):
    format: Literal["auto", "json", "console", "gcp"] = Field(
        "auto",
        description="auto: native journald entries when stdout is the journal, readable console output on a terminal, "
        "gcp on Cloud Run and Kubernetes, JSON lines otherwise; json: always JSON lines on stdout; console: always "
        "console output; gcp: Cloud Logging's structured JSON lines (severity, message, time, trace, labels).",
    )
    level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="The least level logged.")
    # The least the Google client libraries log at: their debug output holds payloads.
    google_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="The least the google, grpc and urllib3 loggers log at, whatever `level` is."
    )

    @field_validator("level", "format", "google_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


# The parsed TOML document for the settings being built; a context variable so that
# pydantic-settings' class-level source hook can see a per-call file.


DEFAULT_LISTEN = "127.0.0.1:9464"
# Where the built-in default goes when its port is taken: another instance on this host holds it.
FALLBACK_LISTEN = "127.0.0.1:0"


class MetricsSettings(Section):
    listen: str = Field(
        DEFAULT_LISTEN,
        description="HOST:PORT serving /metrics, /healthz and /readyz (loopback by default). Empty: off. Port 0: any "
        "free port. Left unset, a taken 9464 (another instance on this host) gives any free loopback port instead; "
        "set in the file or the environment, a taken port is a config error (exit 78). The address is logged as "
        "`metrics.listening` and written to `file_sd`.",
    )
    file_sd: str = Field(
        "",
        description="A Prometheus file_sd target file naming this daemon's /metrics address, with its subscription as "
        "a label: written at start (a failure is a `metrics.file_sd_failed` warning), removed at a clean stop. Empty: "
        "$RUNTIME_DIRECTORY/prometheus.json under systemd (the units copy it to /run/consumerd-sd/), else none.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.match(r"^[^:\s\[\]]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", value):
            raise ValueError('must be HOST:PORT (e.g. 127.0.0.1:9464), or "" to turn metrics off')
        if value and int(value.rpartition(":")[2]) > 65535:
            raise ValueError("port must be 0..65535")
        return value

    def fallback(self) -> str | None:
        """Where to listen when `listen` is taken: any free loopback port for the built-in default only,
        so that several instances on one host all start; an address the operator chose is kept to.
        Ask at start-up: a reload rebuilds the settings from a dump, which marks every key as set."""
        return None if "listen" in self.model_fields_set else FALLBACK_LISTEN

    def file_sd_path(self) -> Path | None:
        """The target file to write, if any: none without a metrics server to point at."""
        if not self.listen:
            return None
        if self.file_sd:
            return Path(self.file_sd)
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(runtime) / "prometheus.json" if runtime else None


class ControlSettings(Section):
    socket: str = Field(
        "",
        description="Path of the control socket (`consumerd status|pause|resume|drain|scale`). Empty: "
        "$RUNTIME_DIRECTORY/control.sock under systemd, else no socket.",
    )
    group: str = Field("", description="A group whose members may read `status`: the socket becomes 0660 instead of 0600.")

    def socket_path(self) -> str:
        if self.socket:
            return self.socket
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return f"{runtime}/control.sock" if runtime else ""

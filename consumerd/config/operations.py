"""[logging], [metrics] and [control]: how operators watch and steer the daemon."""

from __future__ import annotations

import os
import re
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


class MetricsSettings(Section):
    listen: str = Field(
        "127.0.0.1:9464",
        description="HOST:PORT serving /metrics, /healthz and /readyz (loopback by default). Empty: off. Port 0: any "
        "free port, logged as `metrics.listening`.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.match(r"^[^:\s\[\]]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", value):
            raise ValueError('must be HOST:PORT (e.g. 127.0.0.1:9464), or "" to turn metrics off')
        if value and int(value.rpartition(":")[2]) > 65535:
            raise ValueError("port must be 0..65535")
        return value


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

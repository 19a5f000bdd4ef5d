"""[pubsub]: the project, the subscription, the endpoint and credentials."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from consumerd.config.section import Section

_SUBSCRIPTION_PATH = re.compile(r"^projects/(?P<project>[^/]+)/subscriptions/(?P<name>[^/]+)$")
_SHORT_NAME = re.compile(r"^[A-Za-z][-A-Za-z0-9_.~+%]{2,254}$")


class PubSubSettings(Section):
    project: str = Field(
        "", description="Google Cloud project. Empty: $GOOGLE_CLOUD_PROJECT, else the project of a full subscription path."
    )
    subscription: str = Field(
        "",
        description="The subscription to consume: a short name or projects/PROJECT/subscriptions/NAME. "
        "Required by `run`, which never creates it (`consumerd setup`, Terraform or gcloud do).",
    )
    emulator_host: str = Field(
        "",
        description="HOST:PORT of a Pub/Sub emulator. Empty: $PUBSUB_EMULATOR_HOST, else the real service. Plaintext and "
        "without credentials: a host that is not loopback is logged as `pubsub.emulator_not_loopback` at start.",
    )
    # HOST:PORT of the service over TLS: the global endpoint, a regional one
    # (europe-west1-pubsub.googleapis.com:443) or a Private Service Connect name.
    endpoint: str = Field(
        "pubsub.googleapis.com:443",
        description="HOST:PORT of the service, over TLS: the global endpoint, a regional one "
        "(europe-west1-pubsub.googleapis.com:443) or a Private Service Connect name.",
    )
    credentials_file: str = Field(
        "",
        description="A service-account key (JSON). A relative path is looked up in systemd's $CREDENTIALS_DIRECTORY "
        "(LoadCredential=). Empty: Application Default Credentials.",
    )
    startup_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds to keep retrying an unreachable Pub/Sub at start-up before exiting with 69."
    )
    pull_timeout: float = Field(
        30.0, ge=2, le=60, description="Seconds an empty long poll waits for messages; also how soon a hung Pub/Sub fails /readyz."
    )

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

"""[leases], [retry], [dead_letter], [flow] and [shutdown]: what happens to messages and when."""

from __future__ import annotations

from pydantic import Field, model_validator

from consumerd.config.section import Section


class LeaseSettings(Section):
    ack_deadline: int = Field(60, ge=10, le=600)
    adaptive: bool = True
    min_ack_deadline: int = Field(10, ge=10, le=600)
    max_ack_deadline: int = Field(600, ge=10, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> LeaseSettings:
        if self.min_ack_deadline > self.max_ack_deadline:
            raise ValueError("min_ack_deadline must not exceed max_ack_deadline")
        return self


class RetrySettings(Section):
    min_backoff: float = Field(1.0, ge=0, le=600)
    max_backoff: float = Field(600.0, ge=0, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> RetrySettings:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff must not exceed max_backoff")
        return self


class DeadLetterSettings(Section):
    topic: str = ""
    max_attempts: int = Field(0, ge=0, le=1000)

    @model_validator(mode="after")
    def _needs_topic(self) -> DeadLetterSettings:
        if self.max_attempts and not self.topic:
            raise ValueError("max_attempts needs a topic to forward to")
        return self


class FlowSettings(Section):
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=0)
    max_message_bytes: int = Field(0, ge=0)


class ShutdownSettings(Section):
    drain_timeout: float = Field(60, ge=0, le=86400)

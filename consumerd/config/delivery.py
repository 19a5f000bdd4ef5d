"""[leases], [retry], [dead_letter], [flow] and [shutdown]: what happens to messages and when."""

from __future__ import annotations

from pydantic import Field, model_validator

from consumerd.config.section import Section


class LeaseSettings(Section):
    ack_deadline: int = Field(
        60, ge=10, le=600, description="Seconds each lease renewal asks for; with `adaptive`, until 10 tasks have finished."
    )
    adaptive: bool = Field(
        True, description="Renew with the 99th percentile of task durations, clamped to min_ack_deadline..max_ack_deadline."
    )
    min_ack_deadline: int = Field(10, ge=10, le=600, description="Seconds: the shortest lease the adaptive length may ask for.")
    max_ack_deadline: int = Field(600, ge=10, le=600, description="Seconds: the longest lease the adaptive length may ask for.")

    @model_validator(mode="after")
    def _ordered(self) -> LeaseSettings:
        if self.min_ack_deadline > self.max_ack_deadline:
            raise ValueError("min_ack_deadline must not exceed max_ack_deadline")
        return self


class RetrySettings(Section):
    min_backoff: float = Field(
        1.0,
        ge=0,
        le=600,
        description="Seconds: the least delay before a failed message comes back. The delay's ceiling doubles with "
        "each attempt (min_backoff * 2**(attempt - 1)), with full jitter.",
    )
    max_backoff: float = Field(
        600.0,
        ge=0,
        le=600,
        description="Seconds: the longest retry delay; also how long a reject is held when there is no dead-letter topic.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetrySettings:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff must not exceed max_backoff")
        return self


class DeadLetterSettings(Section):
    topic: str = Field(
        "",
        description="Topic for rejected messages (it must exist): a copy is published there, and only then is the "
        "original acked. Empty: rejects are held at retry.max_backoff and logged as errors, never dropped.",
    )
    max_attempts: int = Field(
        0, ge=0, le=1000, description="Forward a message to the topic once it failed this many attempts (0 = never). Needs topic."
    )

    @model_validator(mode="after")
    def _needs_topic(self) -> DeadLetterSettings:
        if self.max_attempts and not self.topic:
            raise ValueError("max_attempts needs a topic to forward to")
        return self


class FlowSettings(Section):
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Bytes of messages held at once (data, attribute keys and values, ordering key): pulling pauses at "
        "the budget, and a message starts only if it fits beside those running (one alone always may). 0 = no limit.",
    )
    max_message_bytes: int = Field(
        0, ge=0, description="Larger messages (counted the same way) are rejects instead of going to a worker. 0 = no limit."
    )


class ShutdownSettings(Section):
    drain_timeout: float = Field(
        60,
        ge=0,
        le=86400,
        description="Seconds a drain (SIGTERM, `consumerd drain`) waits for running tasks before ending them and giving "
        "their messages back.",
    )
    kill_grace: float = Field(
        5,
        ge=0.1,
        le=300,
        description="Seconds between SIGTERM and SIGKILL to the tasks still running when a drain ends. A drain takes "
        "at most drain_timeout + kill_grace + flush_timeout: keep that within the platform's stop grace.",
    )
    flush_timeout: float = Field(
        10,
        ge=0.1,
        le=300,
        description="Seconds the daemon waits at exit for its last acks and nacks to reach Pub/Sub. A message whose ack "
        "is cut off comes back after its lease: a repeat, never a loss.",
    )

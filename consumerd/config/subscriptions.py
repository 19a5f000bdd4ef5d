"""[[subscriptions]]: several subscriptions in one daemon, sharing one worker pool by weight.

Each entry names a subscription and may override, for it alone, the sections that are about its
messages (how they route, retry, dead-letter, lease, and how many bytes of them may be held). The
daemon builds one complete `Settings` per subscription from these (`streams`), so every part that
serves a subscription reads its own settings exactly as a one-subscription daemon reads the global
ones.
"""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator

from consumerd.config.pubsub import PubSubSettings
from consumerd.config.section import Section


class TaskOverrides(Section):
    default: str | None = Field(None, description="tasks.default for this subscription's messages.")
    route_attribute: str | None = Field(None, min_length=1, description="tasks.route_attribute for this subscription's messages.")


class DeadLetterOverrides(Section):
    topic: str | None = Field(None, description="dead_letter.topic for this subscription's rejects.")
    max_attempts: int | None = Field(None, ge=0, le=1000, description="dead_letter.max_attempts for this subscription.")


class FlowOverrides(Section):
    max_inflight_bytes: int | None = Field(None, ge=0, description="flow.max_inflight_bytes for this subscription's messages.")


class LeaseOverrides(Section):
    ack_deadline: int | None = Field(None, ge=10, le=600, description="leases.ack_deadline for this subscription.")
    adaptive: bool | None = Field(None, description="leases.adaptive for this subscription.")
    min_ack_deadline: int | None = Field(None, ge=10, le=600, description="leases.min_ack_deadline for this subscription.")
    max_ack_deadline: int | None = Field(None, ge=10, le=600, description="leases.max_ack_deadline for this subscription.")


class RetryOverrides(Section):
    min_backoff: float | None = Field(None, ge=0, le=600, description="retry.min_backoff for this subscription.")
    max_backoff: float | None = Field(None, ge=0, le=600, description="retry.max_backoff for this subscription.")


class SubscriptionSettings(Section):
    name: str = Field(description="The subscription: a short name (in pubsub.project) or projects/PROJECT/subscriptions/NAME.")
    weight: int = Field(
        1,
        ge=1,
        le=1000,
        description="Its share of the workers while several subscriptions have messages waiting; an idle one lends its share.",
    )
    max_concurrency: int = Field(
        0, ge=0, le=1024, description="At most this many of its messages run at once (0: as many as there are workers)."
    )
    tasks: TaskOverrides = Field(TaskOverrides(), description="Overrides of [tasks] for this subscription: default, route_attribute.")
    dead_letter: DeadLetterOverrides = Field(DeadLetterOverrides(), description="Overrides of [dead_letter] for this subscription.")
    flow: FlowOverrides = Field(FlowOverrides(), description="Overrides of [flow] for this subscription: max_inflight_bytes.")
    leases: LeaseOverrides = Field(LeaseOverrides(), description="Overrides of [leases] for this subscription.")
    retry: RetryOverrides = Field(RetryOverrides(), description="Overrides of [retry] for this subscription.")

    @field_validator("name")
    @classmethod
    def _subscription_name(cls, value: str) -> str:
        try:
            PubSubSettings(subscription=value)  # the same rule as pubsub.subscription
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    def overrides(self) -> dict[str, dict[str, object]]:
        """Section -> the keys this subscription sets (only those)."""
        sections = {"tasks": self.tasks, "dead_letter": self.dead_letter, "flow": self.flow, "leases": self.leases, "retry": self.retry}
        return {name: values for name, section in sections.items() if (values := section.model_dump(exclude_none=True))}


def check_unique(subscriptions: list[SubscriptionSettings], project: str) -> None:
    """Two entries for one subscription would lease each other's messages: refused."""
    seen: set[str] = set()
    for entry in subscriptions:
        path = PubSubSettings(project=project, subscription=entry.name).subscription_path
        if path in seen:
            raise ValueError(f"subscription {entry.name!r} is listed twice")
        seen.add(path)

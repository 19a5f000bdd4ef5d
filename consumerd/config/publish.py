"""[publish]: the topics tasks may publish their results to, and how much one task may publish."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from consumerd.config.section import Section

# A topic name (3-255 characters, starting with a letter) or its full path.
_TOPIC = re.compile(r"^(projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/)?[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")


class PublishSettings(Section):
    topics: list[str] = Field(
        default_factory=list,
        description="The topics `consumerd.publish()` may publish to: short names (resolved against pubsub.project) or "
        "full paths; each must exist at start-up. A publish to any other topic fails the task. Empty: publishing is off.",
    )
    max_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1,
        le=64 * 1024 * 1024,
        description="Bytes one task call may publish (data, attributes and ordering keys of all its outputs); more is a "
        "failure of that task. The outputs count in flow.max_inflight_bytes until Pub/Sub accepted them.",
    )
    max_outputs: int = Field(1000, ge=1, le=10_000, description="Outputs one task call may publish; more is a failure of that task.")

    @field_validator("topics")
    @classmethod
    def _topic_names(cls, topics: list[str]) -> list[str]:
        for topic in topics:
            if not _TOPIC.match(topic):
                raise ValueError(f"{topic!r} is not a topic name (3-255 characters, starting with a letter) or projects/P/topics/T")
        if len(set(topics)) != len(topics):
            raise ValueError("a topic is listed twice")
        return topics

"""A message a task published (`consumerd.publish`), on its way from the worker to the supervisor.

The worker buffers a task's outputs and sends them, one frame each, just before the task's success
result; the supervisor publishes them with its own credentials and acks the input only once Pub/Sub
accepted all of them. An output frame is ``b"O"``, a 4-byte header length, a JSON header (seq,
topic, attributes, ordering key) and the raw data: binary data crosses unencoded, and a frame never
starts like a JSON result (``[``). Both sides check the same limits: the worker to fail the task with
a clear error, the supervisor because it trusts nothing a worker sends.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from consumerd.errors import WorkerProtocolError

if TYPE_CHECKING:
    from consumerd.config import Settings

MARK = b"O"
_HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER = 256 * 1024  # 100 attributes of 256 + 1024 bytes, a topic and a key, JSON-escaped
MAX_DATA = 10_000_000  # Pub/Sub's limit on one message
MAX_ATTRIBUTES = 100  # Pub/Sub's limit, counting the consumerd_source_message_id the supervisor adds
MAX_ATTRIBUTE_KEY = 256  # bytes
MAX_ATTRIBUTE_VALUE = 1024  # bytes
MAX_ORDERING_KEY = 1024  # bytes
MAX_TOPIC = 512  # characters of `projects/P/topics/T` (a project id is <= 30, a topic name <= 255)
MAX_FRAME = 1 + _HEADER_LENGTH.size + MAX_HEADER + MAX_DATA
SOURCE_ATTRIBUTE = "consumerd_source_message_id"  # set by the supervisor on every output: for deduplication


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    seq: int  # the job whose task published it
    topic: str  # a full topic path
    data: bytes
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ordering_key: str = ""

    @property
    def size(self) -> int:
        """Bytes it weighs in the byte budget, counted as an input message's are."""
        attributes = sum(len(k.encode()) + len(v.encode()) for k, v in self.attributes.items())
        return len(self.data) + attributes + len(self.ordering_key.encode())

    def encode(self) -> bytes:
        header = {"seq": self.seq, "topic": self.topic, "attributes": dict(self.attributes), "ordering_key": self.ordering_key}
        head = json.dumps(header, separators=(",", ":")).encode()
        return MARK + _HEADER_LENGTH.pack(len(head)) + head + self.data

    @classmethod
    def decode(cls, payload: bytes) -> Output:
        """Parse and validate one output frame; anything off raises WorkerProtocolError."""
        start = len(MARK) + _HEADER_LENGTH.size
        if len(payload) < start or not payload.startswith(MARK):
            raise WorkerProtocolError("output: truncated frame")
        (length,) = _HEADER_LENGTH.unpack_from(payload, len(MARK))
        if length > MAX_HEADER or start + length > len(payload):
            raise WorkerProtocolError("output: header length out of range")
        try:
            header = json.loads(payload[start : start + length])
        except (ValueError, RecursionError):
            raise WorkerProtocolError("output: undecodable header") from None
        if not (isinstance(header, dict) and set(header) == {"seq", "topic", "attributes", "ordering_key"}):
            raise WorkerProtocolError("output: expected a header of seq, topic, attributes, ordering_key")
        seq, topic, attributes, key = header["seq"], header["topic"], header["attributes"], header["ordering_key"]
        if not (isinstance(seq, int) and not isinstance(seq, bool) and seq > 0):
            raise WorkerProtocolError("output: seq must be a positive integer")
        if not (isinstance(topic, str) and isinstance(key, str) and isinstance(attributes, dict)):
            raise WorkerProtocolError("output: topic and ordering_key must be text, attributes an object")
        data = payload[start + length :]
        if problem := problem_of(topic, data, attributes, key):
            raise WorkerProtocolError(f"output: {problem}")
        return cls(seq, topic, data, attributes, key)


def problem_of(topic: str, data: bytes, attributes: Mapping[Any, Any], ordering_key: str) -> str:
    """What makes this output one Pub/Sub would refuse, or one the protocol does not allow ("": none)."""
    if not topic or len(topic) > MAX_TOPIC:
        return f"a topic is 1 to {MAX_TOPIC} characters"
    if len(data) > MAX_DATA:
        return f"data of {len(data)} bytes exceeds Pub/Sub's limit of {MAX_DATA}"
    if len(attributes) > MAX_ATTRIBUTES - 1:
        return f"at most {MAX_ATTRIBUTES - 1} attributes (Pub/Sub allows {MAX_ATTRIBUTES}; consumerd adds {SOURCE_ATTRIBUTE})"
    for name, value in attributes.items():
        if not (isinstance(name, str) and isinstance(value, str)):
            return "attribute names and values must be text"
        if not name or len(name.encode()) > MAX_ATTRIBUTE_KEY or name.startswith("goog"):
            return f"attribute name {name[:40]!r}: 1 to {MAX_ATTRIBUTE_KEY} bytes, not starting with 'goog'"
        if len(value.encode()) > MAX_ATTRIBUTE_VALUE:
            return f"attribute {name[:40]!r}: a value of at most {MAX_ATTRIBUTE_VALUE} bytes"
        if name == SOURCE_ATTRIBUTE:
            return f"attribute {SOURCE_ATTRIBUTE!r} is set by consumerd"
    if len(ordering_key.encode()) > MAX_ORDERING_KEY:
        return f"an ordering key is at most {MAX_ORDERING_KEY} bytes"
    return ""


def topic_path(project: str, topic: str) -> str:
    """A short topic name resolved against ``project``; a full path, or no project known, as it is."""
    if topic.startswith("projects/") or not project:
        return topic
    return f"projects/{project}/topics/{topic}"


class OutputsTooLarge(WorkerProtocolError):
    """A worker sent more outputs for one task than the limits allow (its own check was bypassed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PublishRules:
    """What a task call may publish: [publish] as the worker and the supervisor both apply it."""

    topics: frozenset[str] | None = frozenset()  # full paths; None: any topic (run_task without an allow-list)
    max_bytes: int = 10 * 1024 * 1024
    max_outputs: int = 1000
    project: str = ""  # short topic names resolve against it

    @classmethod
    def of(cls, settings: Settings) -> PublishRules:
        """[publish] with its topics resolved to full paths."""
        publish = settings.publish
        topics = frozenset(settings.pubsub.topic_path(topic) for topic in publish.topics)
        return cls(topics, publish.max_bytes, publish.max_outputs, settings.pubsub.project)

    def resolve(self, topic: str) -> str:
        return topic_path(self.project, topic)

    def refusal(self, topic: str) -> str:
        """Why a task may not publish to ``topic`` (a full path), or "" when it may."""
        if self.topics is None or topic in self.topics:
            return ""
        if not self.topics:
            return "publishing is off: no [publish] topics are configured"
        return f"topic {topic!r} is not in [publish] topics"

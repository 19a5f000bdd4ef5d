"""`consumerd.publish`: a task's outputs, buffered in the worker until the task ends.

Nothing is sent while the task runs. A task that succeeds has its outputs sent to the supervisor
just before its result (`ipc.outputs`); one that fails in any way has them dropped with it. The
buffer of the running task is a context variable, so each `async def` task on a worker's event
loop has its own. The limits are checked here, at the `publish` call, so the task that exceeds one
fails with a clear `PublishError` in its own traceback; the supervisor checks them again.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import pydantic_core

from consumerd.errors import PublishError
from consumerd.ipc.outputs import Output, PublishRules, problem_of

_rules = PublishRules()  # the fork server's [publish]: set once, before any worker is forked
_current: contextvars.ContextVar[Outputs | None] = contextvars.ContextVar("consumerd_outputs", default=None)


def configure(rules: PublishRules) -> None:
    global _rules
    _rules = rules


def rules() -> PublishRules:
    return _rules


class Outputs:
    """What one task call published so far, within ``rules``."""

    def __init__(self, seq: int, rules: PublishRules, batch: bool = False) -> None:
        self.seq = seq
        self.rules = rules
        self.batch = batch
        self.items: list[Output] = []
        self.size = 0

    def add(self, topic: str, data: Any, ordering_key: str, attributes: dict[str, Any]) -> None:
        if self.batch:
            raise PublishError("publish() is not available in a batch task: each message's outputs must be its own")
        if not isinstance(topic, str):
            raise PublishError(f"publish(): the topic must be a name or path, not {type(topic).__name__}")
        path = self.rules.resolve(topic)
        output = Output(self.seq, path, encoded(data), {k: str(v) for k, v in attributes.items()}, ordering_key)
        if refusal := self.rules.refusal(path):
            raise PublishError(f"publish({topic!r}): {refusal}")
        if problem := problem_of(path, output.data, output.attributes, ordering_key):
            raise PublishError(f"publish({topic!r}): {problem}")
        if len(self.items) >= self.rules.max_outputs:
            raise PublishError(f"publish(): at most {self.rules.max_outputs} outputs per task call ([publish] max_outputs)")
        if self.size + output.size > self.rules.max_bytes:
            raise PublishError(f"publish(): the outputs of one task call exceed {self.rules.max_bytes} bytes ([publish] max_bytes)")
        self.items.append(output)
        self.size += output.size


def encoded(data: Any) -> bytes:
    """bytes as they are, text as UTF-8, a pydantic model or any JSON-serialisable value as JSON."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    try:
        return pydantic_core.to_json(data)
    except pydantic_core.PydanticSerializationError as exc:
        raise PublishError(f"publish(): {type(data).__name__} is neither bytes, text nor JSON-serialisable: {exc}") from None


@contextlib.contextmanager
def collecting(seq: int, batch: bool = False, rules: PublishRules | None = None) -> Iterator[Outputs]:
    """The outputs of the task call running inside this block."""
    outputs = Outputs(seq, rules if rules is not None else _rules, batch)
    token = _current.set(outputs)
    try:
        yield outputs
    finally:
        _current.reset(token)


def publish(topic: str, data: Any, ordering_key: str = "", **attributes: Any) -> None:
    """Publish ``data`` to ``topic`` once this task succeeds (before its message is acked).

    ``topic``: a name in `[publish] topics` (resolved against pubsub.project) or its full path.
    ``data``: bytes, text (UTF-8), a pydantic model or any JSON-serialisable value. The
    ``attributes`` become the message's attributes (values as text); consumerd adds
    ``consumerd_source_message_id``. At least once: a crash before the ack publishes it again.
    """
    outputs = _current.get()
    if outputs is None:
        raise RuntimeError("consumerd.publish() is called from inside a running task only")
    if not isinstance(ordering_key, str):
        raise PublishError("publish(): ordering_key must be text")
    outputs.add(topic, data, ordering_key, attributes)

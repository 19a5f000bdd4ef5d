"""How a task is called: with the message, or with its payload validated into the annotated type.

Decided once, at `@task`, from the signature: a parameter annotated `Message` (a batch task:
`list[Message]`) gets the message; one annotated with anything pydantic's `TypeAdapter` accepts (a
model, a dataclass, a TypedDict, `list[Model]`...) gets the payload, parsed as JSON and validated
into it. A batch task's payload parameter is `list[X]`: each message is validated into X alone, so
one bad message is rejected without holding up the rest. The adapter is built here, in the fork
server, so every worker forked from it inherits it ready to use.

A payload that is not JSON or does not validate raises `PayloadError`: a reject, dead-lettered
with the validation errors (locations and messages, never the input values) as its reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from consumerd.errors import PayloadError, RegistryError
from consumerd.message import Message

MAX_LISTED_ERRORS = 20  # validation errors named in a reject's reason; the rest are counted
_PASSED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclasses.dataclass(frozen=True)
class Signature:
    """How to call one task. ``adapter`` is None for a task that takes the message alone."""

    payload: str = ""  # the payload parameter's name
    message: str = ""  # the message parameter's name, when a typed task takes it too
    positional: tuple[str, ...] = ()  # positional-only parameters, in order; the rest go by name
    adapter: Any = None  # pydantic.TypeAdapter of the payload type (of one item, for a batch task)
    type_name: str = ""  # the payload type, as errors and `consumerd tasks` show it

    @property
    def typed(self) -> bool:
        return self.adapter is not None

    def validate(self, message: Message) -> Any:
        """The payload of ``message`` as the annotated type; PayloadError when it is not one."""
        from pydantic import ValidationError

        try:
            return self.adapter.validate_json(message.data)
        except ValidationError as exc:
            raise PayloadError(validation_reason(self.type_name, exc)) from None

    def arguments(self, payload: Any, message: Any) -> tuple[list[Any], dict[str, Any]]:
        values = {self.payload: payload, self.message: message}
        args = [values[name] for name in self.positional]
        kwargs = {name: values[name] for name in (self.payload, self.message) if name and name not in self.positional}
        return args, kwargs

    def call(self, func: Callable[..., object], message: Message) -> object:
        """Call a one-message task (validating first: PayloadError before the task runs)."""
        if not self.typed:
            return func(message)
        args, kwargs = self.arguments(self.validate(message), message)
        return func(*args, **kwargs)

    def call_batch(self, func: Callable[..., object], messages: Sequence[Message], values: Sequence[Any]) -> object:
        """Call a batch task with ``messages`` and, when typed, their validated ``values``."""
        if not self.typed:
            return func(list(messages))
        args, kwargs = self.arguments(list(values), list(messages))
        return func(*args, **kwargs)

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema of one payload (of one message's, for a batch task); None when untyped."""
        return self.adapter.json_schema() if self.typed else None


def validation_reason(type_name: str, exc: Any) -> str:
    """A reject's reason: where and why, never the input (payloads may hold what logs must not)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    listed = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(payload)'}: {e['msg']}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"; and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
    return f"payload is not a valid {type_name}: {count}: {listed}{more}"


def signature_of(func: Callable[..., object], *, batch: bool, where: str) -> Signature:
    """Decide how ``func`` is called, or raise RegistryError naming what is wrong (``where``: the task)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return Signature()  # a callable without a signature (a builtin): called with the message, as always
    hints = _hints(func, where)
    payloads = [p for p in params if p.kind in _PASSED and _is_payload(hints.get(p.name, inspect.Parameter.empty))]
    if not payloads:
        _check_takes_one(params, where)
        return Signature()
    if len(payloads) > 1:
        raise RegistryError(f"{where}: one parameter takes the payload, not {len(payloads)} ({', '.join(p.name for p in payloads)})")
    [payload] = payloads
    messages = [p for p in params if p.kind in _PASSED and p is not payload and _is_message(hints.get(p.name), batch)]
    extra = [p for p in params if p is not payload and p not in messages and p.default is inspect.Parameter.empty]
    if extra or len(messages) > 1:
        wanted = "list[Message]" if batch else "Message"
        names = ", ".join(p.name for p in (extra or messages))
        raise RegistryError(f"{where}: parameter {names} is neither the payload nor the message: annotate one parameter {wanted}")
    annotation = hints[payload.name]
    if batch:
        if typing.get_origin(annotation) is not list or len(typing.get_args(annotation)) != 1:
            raise RegistryError(f"{where}: a batch task's payload parameter {payload.name!r} must be list[X] (one X per message)")
        annotation = typing.get_args(annotation)[0]
    message = messages[0].name if messages else ""
    positional = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.name in (payload.name, message))
    return Signature(payload.name, message, positional, _adapter(annotation, where), _type_name(annotation))


class _Parameters:
    """The parameters' annotations alone, resolved in the function's own module: a return
    annotation never decides how a task is called, so one that does not resolve is no error."""

    def __init__(self, func: Callable[..., object], annotations: dict[str, Any]) -> None:
        self.__wrapped__ = func
        self.__annotations__ = annotations


def _hints(func: Callable[..., object], where: str) -> dict[str, Any]:
    target = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        return {}  # a partial, a builtin: no annotations of its own to read
    annotations = {k: v for k, v in getattr(target, "__annotations__", {}).items() if k != "return"}
    try:
        return typing.get_type_hints(_Parameters(target, annotations))
    except Exception as exc:  # noqa: BLE001 - an annotation naming what its module cannot resolve
        raise RegistryError(f"{where}: cannot resolve its annotations: {type(exc).__name__}: {exc}") from None


def _is_message(annotation: Any, batch: bool) -> bool:
    if batch:
        return typing.get_origin(annotation) is list and typing.get_args(annotation) == (Message,)
    return annotation is Message


def _is_payload(annotation: Any) -> bool:
    """Anything but no annotation, Any/object, or the message (alone or in a list)."""
    if annotation in (inspect.Parameter.empty, Any, object, Message):
        return False
    return not (typing.get_origin(annotation) is list and typing.get_args(annotation) == (Message,))


def _check_takes_one(params: list[inspect.Parameter], where: str) -> None:
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    takes = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) or bool(positional)
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind in _PASSED]
    if not takes or len(required) > 1 or (required and required[0] not in positional[:1]):
        raise RegistryError(f"{where}: a task takes the message as its one parameter (or a typed payload: see 'Typed payloads')")


def _adapter(annotation: Any, where: str) -> Any:
    from pydantic import PydanticUserError, TypeAdapter

    try:
        return TypeAdapter(annotation)
    except (PydanticUserError, TypeError) as exc:  # the first names the fix (typing_extensions.TypedDict, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RegistryError(f"{where}: pydantic cannot validate a payload into {_type_name(annotation)}: {first}") from None


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is not None and args and isinstance(origin, type):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")

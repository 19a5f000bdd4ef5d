"""Every record that crosses a process boundary between the supervisor, the fork server and workers.

Trust runs one way. The supervisor is trusted, so what it sends (the fork server's spec, jobs) may be
pickled. The fork server and the workers run the user's task code (module imports, task functions),
so what they send back is never unpickled: control packets and results are JSON in a fixed schema,
size-limited and validated field by field. Anything else is a `WorkerProtocolError`, which the
supervisor treats as a crashed worker (or a failed fork server), never as an exception in its loop.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, NamedTuple, TypeGuard

from consumerd.errors import WorkerProtocolError
from consumerd.ipc.outputs import Output, PublishRules
from consumerd.message import Message

MAX_PACKET = 64 * 1024  # one control packet (SOCK_SEQPACKET), either direction
MAX_RESULT_FRAME = 64 * 1024  # one result frame from a worker; larger is a protocol error
MAX_ERROR_CHARS = 4096  # a worker cuts the error text to this before sending
MAX_TASKS = 10_000  # task names a fork server may announce
MAX_RATE_LIMIT = 1_000_000  # messages per second: a `rate_limit` above it is a typo, not a limit
MAX_CODE_FILES = 2000  # source files a fork server may list in its Ready packet (as many as fit)
MAX_PATH_CHARS = 4096  # one such file's path
MAX_TRACEBACK_CHARS = 16_000  # the traceback of task code that failed to import (its last characters)


class Outcome(enum.StrEnum):
    """How one attempt at a message ended."""

    SUCCESS = "success"
    ERROR = "error"  # the task raised
    CRASH = "crash"  # its worker died (or broke the protocol)
    TIMEOUT = "timeout"  # killed at task_timeout
    RETRY = "retry"  # the task raised Retry(after=...)
    REJECT = "reject"  # the task raised Reject (or a PayloadError)
    UNKNOWN_TASK = "unknown_task"
    TOO_LARGE = "too_large"
    INTERRUPTED = "interrupted"  # we stopped it (shutdown): not the task's doing
    SHUTDOWN = "shutdown"


# What a worker may report; the rest are decided by the supervisor alone.
# TIMEOUT: an async task the worker cancelled at its timeout (a sync one is killed by the supervisor).
WORKER_OUTCOMES = frozenset({Outcome.SUCCESS, Outcome.ERROR, Outcome.RETRY, Outcome.REJECT, Outcome.UNKNOWN_TASK, Outcome.TIMEOUT})
MAX_BATCH = 1000  # messages per batch call: what one Pub/Sub pull returns at most


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task overrides of the global settings, from `@task(...)`; None = the global value."""

    timeout: float | None = None  # replaces workers.task_timeout
    concurrency: int | None = None  # at most this many of the task run at once on this host
    min_backoff: float | None = None  # replace retry.min_backoff / max_backoff
    max_backoff: float | None = None
    max_attempts: int | None = None  # replaces dead_letter.max_attempts
    batch_size: int | None = None  # a batch task: called with up to this many messages at once
    batch_wait: float | None = None  # seconds a batch may wait to fill (default 1.0)
    is_async: bool = False  # an `async def` task: runs on the worker's event loop
    rate_limit: float | None = None  # messages per second that may start (`@task(rate_limit="20/s")`, parsed)

    @property
    def batch(self) -> int:
        """Messages per call: 1 for a task that takes one message."""
        return self.batch_size or 1

    def problems(self) -> list[str]:
        """What is wrong with these values (empty: valid). Checked where they are made and received."""
        out = []
        if self.timeout is not None and not (is_number(self.timeout) and 0 < self.timeout <= 86400):
            out.append("timeout must be a number of seconds in (0, 86400]")
        if self.concurrency is not None and not (_is_int(self.concurrency) and 1 <= self.concurrency <= 1024):
            out.append("concurrency must be a whole number from 1 to 1024")
        for name in ("min_backoff", "max_backoff"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 <= value <= 600):
                out.append(f"{name} must be a number of seconds from 0 to 600")
        if is_number(self.min_backoff) and is_number(self.max_backoff) and self.min_backoff > self.max_backoff:
            out.append("min_backoff must not exceed max_backoff")
        if self.max_attempts is not None and not (_is_int(self.max_attempts) and 1 <= self.max_attempts <= 1000):
            out.append("max_attempts must be a whole number from 1 to 1000")
        if self.batch_size is not None and not (_is_int(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH):
            out.append(f"batch_size must be a whole number from 1 to {MAX_BATCH}")
        if self.batch_wait is not None and not (is_number(self.batch_wait) and 0 <= self.batch_wait <= 60):
            out.append("batch_wait must be a number of seconds from 0 to 60")
        if self.batch_wait is not None and self.batch_size is None:
            out.append("batch_wait needs batch_size")
        if not isinstance(self.is_async, bool):
            out.append("is_async must be true or false")
        if self.rate_limit is not None and not (is_number(self.rate_limit) and 0 < self.rate_limit <= MAX_RATE_LIMIT):
            out.append(f"rate_limit must be a number of messages per second in (0, {MAX_RATE_LIMIT}]")
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryLimits:
    """[workers] memory settings in bytes (0 = off), which each worker applies to itself."""

    retire_above: int = 0  # max_memory_per_child: a worker whose RSS is above this after a task retires
    hard_cap: int = 0  # memory_limit: the worker's RLIMIT_DATA, set after fork


@dataclasses.dataclass(frozen=True, slots=True)
class ForkServerSpec:
    """What the fork server needs to preload: the same imports and logging as the supervisor."""

    sys_path: tuple[str, ...]
    modules: tuple[str, ...]
    log_format: str
    log_level: str
    max_tasks_per_child: int
    tracing: bool = False
    environment: tuple[tuple[str, str], ...] = ()  # [workers] environment: added for task code
    hidden_paths: tuple[str, ...] = ()  # made unreadable before any task module is imported (`landlock`)
    project: str = ""  # pubsub.project: the `gcp` log format names each task's trace with it
    publish: PublishRules = PublishRules()  # what `consumerd.publish` may do in a task
    memory: MemoryLimits = MemoryLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    seq: int  # unique per dispatch, so a late or stray result can never match the wrong message
    task: str
    message: Message
    timeout: float = 0.0  # an async task is cancelled by its worker after this (0: never)
    attempt: int = 1  # which attempt at the message this is, for the task hooks

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A slotted dataclass pickles through a Python-level __getstate__; a plain tuple is cheaper for every job.
        return (Job, (self.seq, self.task, self.message, self.timeout, self.attempt))


@dataclasses.dataclass(frozen=True, slots=True)
class BatchJob:
    """One call of a batch task with several messages; the worker sends one result per member."""

    task: str
    jobs: tuple[Job, ...]
    timeout: float = 0.0

    @property
    def seq(self) -> int:
        return self.jobs[0].seq


Unit = Job | BatchJob  # one call of a task; a frame to a worker carries a tuple of them


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    seq: int
    outcome: Outcome  # one of WORKER_OUTCOMES
    duration: float  # seconds the task function ran, measured in the worker
    error: str = ""  # "ExceptionType: text" when not a success
    retry_after: float | None = None  # with RETRY: the delay the task asked for (finite, >= 0)
    outputs: tuple[Output, ...] = ()  # with SUCCESS: what the task published; they travel in frames of their own
    # The worker's memory was past its limits after this call (`worker.memory`): it takes no new job
    # and exits once the supervisor closes its channel, when it holds none.
    over_memory: bool = False

    def encode(self) -> bytes:
        row = [self.seq, self.outcome.value, self.duration, self.error[:MAX_ERROR_CHARS], self.retry_after, self.over_memory]
        return json.dumps(row, allow_nan=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Result:
        """Parse and validate one result frame; anything off raises WorkerProtocolError."""
        row = _json(payload)
        if not (isinstance(row, list) and len(row) == 6):
            raise WorkerProtocolError("result: expected [seq, outcome, duration, error, retry_after, over_memory]")
        seq, outcome, duration, error, retry_after, over_memory = row
        if not (_is_int(seq) and seq > 0):
            raise WorkerProtocolError("result: seq must be a positive integer")
        if outcome not in WORKER_OUTCOMES:
            raise WorkerProtocolError(f"result: outcome {str(outcome)[:40]!r} is not one a worker reports")
        if not (is_number(duration) and duration >= 0):
            raise WorkerProtocolError("result: duration must be a number >= 0")
        if not (isinstance(error, str) and len(error) <= MAX_ERROR_CHARS):
            raise WorkerProtocolError(f"result: error must be text of at most {MAX_ERROR_CHARS} characters")
        if retry_after is not None and not (is_number(retry_after) and retry_after >= 0):
            raise WorkerProtocolError("result: retry_after must be a number >= 0 or null")
        if not isinstance(over_memory, bool):
            raise WorkerProtocolError("result: over_memory must be true or false")
        return cls(
            seq, Outcome(outcome), float(duration), error, None if retry_after is None else float(retry_after), over_memory=over_memory
        )


# -- fork server control packets ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spawn:
    """supervisor -> fork server: fork one more worker."""

    worker_id: int


class CodeFile(NamedTuple):
    """A source file the fork server loaded task code from, as it was then: a reload compares it with
    the file on disk now (the supervisor only stats it, never reads or imports it)."""

    path: str  # absolute
    mtime_ns: int
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """fork server -> supervisor: the task modules imported; these tasks exist, with their options;
    they came from these files."""

    tasks: tuple[tuple[str, TaskOptions], ...]
    files: tuple[CodeFile, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class PreloadFailed:
    """fork server -> supervisor: importing the task modules failed (a config error)."""

    error: str
    traceback: str = ""  # where the task code failed, for a reload's `reload.rejected`


@dataclasses.dataclass(frozen=True, slots=True)
class Spawned:
    """fork server -> supervisor: a worker was forked; its channel fd travels with the packet."""

    worker_id: int
    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Exited:
    """fork server -> supervisor: a worker ended with this raw wait status."""

    pid: int
    status: int


ControlPacket = Spawn | Ready | PreloadFailed | Spawned | Exited
_KINDS: dict[str, type[ControlPacket]] = {
    "spawn": Spawn,
    "ready": Ready,
    "preload_failed": PreloadFailed,
    "spawned": Spawned,
    "exited": Exited,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def encode_control(packet: ControlPacket) -> bytes:
    if isinstance(packet, Ready):
        fields: dict[str, Any] = {"tasks": [{"name": name, **dataclasses.asdict(options)} for name, options in packet.tasks]}
        fields["files"] = [list(f) for f in packet.files]
    else:
        fields = {f.name: getattr(packet, f.name) for f in dataclasses.fields(packet)}
    data = json.dumps({"kind": _KIND_OF[type(packet)], **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise ValueError(f"control packet of {len(data)} bytes exceeds {MAX_PACKET}")
    return data


def decode_control(payload: bytes) -> ControlPacket:
    """Parse and validate one control packet; anything off raises WorkerProtocolError."""
    obj = _json(payload)
    if not isinstance(obj, dict) or obj.get("kind") not in _KINDS:
        raise WorkerProtocolError("control packet: unknown kind")
    kind = obj.pop("kind")
    if kind == "ready":
        tasks, files = obj.get("tasks"), obj.get("files")
        if set(obj) != {"tasks", "files"} or not (isinstance(tasks, list) and len(tasks) <= MAX_TASKS):
            raise WorkerProtocolError("control packet ready: expected a list of tasks")
        if not (isinstance(files, list) and len(files) <= MAX_CODE_FILES):
            raise WorkerProtocolError(f"control packet ready: expected a list of at most {MAX_CODE_FILES} files")
        return Ready(tuple(_task_entry(entry) for entry in tasks), tuple(_code_file(entry) for entry in files))
    if kind == "preload_failed":
        if set(obj) != {"error", "traceback"} or not (isinstance(obj["error"], str) and isinstance(obj["traceback"], str)):
            raise WorkerProtocolError("control packet preload_failed: error and traceback must be text")
        return PreloadFailed(obj["error"][:MAX_ERROR_CHARS], obj["traceback"][-MAX_TRACEBACK_CHARS:])
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(obj) != names or not all(_is_int(v) for v in obj.values()):
        raise WorkerProtocolError(f"control packet {kind}: expected integer fields {sorted(names)}")
    return cls(**obj)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(TaskOptions))


def _task_entry(entry: object) -> tuple[str, TaskOptions]:
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and set(entry) == {"name"} | _OPTION_NAMES):
        raise WorkerProtocolError("control packet ready: each task is {name, options...}")
    options = TaskOptions(**{k: v for k, v in entry.items() if k != "name"})
    if problems := options.problems():
        raise WorkerProtocolError(f"control packet ready: task {entry['name'][:80]!r}: {problems[0]}")
    return entry["name"], options


def _code_file(entry: object) -> CodeFile:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise WorkerProtocolError("control packet ready: each file is [path, mtime_ns, size]")
    path, mtime_ns, size = entry
    if not (isinstance(path, str) and path.startswith("/") and len(path) <= MAX_PATH_CHARS and "\0" not in path):
        raise WorkerProtocolError(f"control packet ready: a file's path must be absolute, at most {MAX_PATH_CHARS} characters")
    if not (_is_int(mtime_ns) and _is_int(size) and mtime_ns >= 0 and size >= 0):
        raise WorkerProtocolError("control packet ready: a file's mtime_ns and size must be integers >= 0")
    return CodeFile(path, mtime_ns, size)


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WorkerProtocolError(f"undecodable frame: {type(exc).__name__}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A real, finite number: not a bool, not NaN or an infinity (what task code and JSON may send)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)

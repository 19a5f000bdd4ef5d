"""Tasks for the integration tests. Each appends to an independent ledger the daemon does not own.

The ledger directory comes from TEST_LEDGER_DIR; each line is `event message_id attempt pid`.
Tasks that misbehave "once" do so on a message's first run only, judged by the ledger.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from consumerd import Message, Reject, Retry, task


def _ledger() -> Path:
    return Path(os.environ["TEST_LEDGER_DIR"]) / "ledger.txt"


def record(event: str, msg: Message) -> None:
    line = f"{event} {msg.message_id} {msg.delivery_attempt or 0} {os.getpid()}\n"
    fd = os.open(_ledger(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)


def runs_so_far(msg: Message) -> int:
    try:
        lines = _ledger().read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.split()[:2] == ["start", msg.message_id])


def _first_run(msg: Message) -> bool:
    record("start", msg)
    return runs_so_far(msg) == 1


@task("ok")
def ok(msg: Message) -> None:
    record("start", msg)
    record("done", msg)


@task("sleep")
def sleep(msg: Message) -> None:
    record("start", msg)
    time.sleep(float(msg.json()["seconds"]))
    record("done", msg)


@task("raise_once")
def raise_once(msg: Message) -> None:
    if _first_run(msg):
        raise ValueError("failing on purpose, first run only")
    record("done", msg)


@task("exit_once")
def exit_once(msg: Message) -> None:
    if _first_run(msg):
        os._exit(1)
    record("done", msg)


@task("sigkill_once")
def sigkill_once(msg: Message) -> None:
    if _first_run(msg):
        os.kill(os.getpid(), signal.SIGKILL)
    record("done", msg)


@task("hang_once")
def hang_once(msg: Message) -> None:
    if _first_run(msg):
        time.sleep(3600)
    record("done", msg)


@task("reject")
def reject(msg: Message) -> None:
    record("start", msg)
    raise Reject("this message can never succeed")


@task("parse")
def parse(msg: Message) -> None:
    record("start", msg)
    msg.json()  # a payload that is not JSON raises PayloadError: a reject
    record("done", msg)


@task("retry_after")
def retry_after(msg: Message) -> None:
    if _first_run(msg):
        raise Retry(after=float(msg.json()["after"]))
    record("done", msg)


@task("always_crash")
def always_crash(msg: Message) -> None:
    record("start", msg)
    os._exit(3)


@task("key")
def key(msg: Message) -> None:
    record(f"key={msg.idempotency_key}", msg)


@task("write_probe")
def write_probe(msg: Message) -> None:
    """Tries to write in several places; records which worked (the hardened unit allows only state)."""
    for path in ("/etc/consumerd-probe", "/opt/src/probe", "/usr/local/probe", os.environ["TEST_LEDGER_DIR"] + "/probe"):
        try:
            with open(path, "w") as handle:
                handle.write("x")
            record(f"writable:{path}", msg)
        except OSError:
            record(f"denied:{path}", msg)
    record(f"uid:{os.getuid()}", msg)
    record("done", msg)


@task("garbage_once")
def garbage_once(msg: Message) -> None:
    """Writes garbage on the worker's result channel (found among the live sockets), first run only."""
    if _first_run(msg):
        import gc
        import socket

        for obj in gc.get_objects():
            if isinstance(obj, socket.socket) and obj.family == socket.AF_UNIX and obj.fileno() >= 0:
                obj.sendall(b"\xff\xff\xff\xffnot a frame")
        time.sleep(30)
    record("done", msg)


@task("ignore_term_once")
def ignore_term_once(msg: Message) -> None:
    if _first_run(msg):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    record("done", msg)


@task("close_stdio")
def close_stdio(msg: Message) -> None:
    record("start", msg)
    for fd in (1, 2):
        try:
            os.close(fd)
        except OSError:
            pass  # closed by an earlier run in this worker already
    record("done", msg)


@task("leave_child")
def leave_child(msg: Message) -> None:
    record("start", msg)
    pid = os.fork()
    if pid == 0:
        time.sleep(3600)
        os._exit(0)
    record(f"child={pid}", msg)
    record("done", msg)


@task("memory_bomb_once")
def memory_bomb_once(msg: Message) -> None:
    """Allocates until the allocator gives up (address space capped so the test host is safe)."""
    if _first_run(msg):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY))
        hoard = []
        while True:
            hoard.append(bytearray(64 * 1024 * 1024))
    record("done", msg)


@task("retry_bad_delay")
def retry_bad_delay(msg: Message) -> None:
    """First run: Retry(after=<the 'after' attribute>): nan, inf and -1 once crashed the supervisor."""
    if _first_run(msg):
        raise Retry(after=float(msg.attributes["after"]))
    record("done", msg)


@task("pickle_bomb_once")
def pickle_bomb_once(msg: Message) -> None:
    """First run: write a pickle frame that would run a command if unpickled, to this worker's channel."""
    if _first_run(msg):
        import pickle
        import socket
        import struct

        marker = Path(os.environ["TEST_LEDGER_DIR"]) / "pwned"

        class Bomb:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return (os.system, (f"touch {marker}",))

        payload = pickle.dumps(Bomb())
        for fd in map(int, os.listdir("/proc/self/fd")):
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                sock.sendall(struct.pack(">I", len(payload)) + payload)
            sock.close()
        time.sleep(5)  # the supervisor kills us for the frame long before this ends
    record("done", msg)


@task("huge_error_once")
def huge_error_once(msg: Message) -> None:
    if _first_run(msg):
        raise ValueError("x" * 5_000_000)
    record("done", msg)


@task("escape_setsid")
def escape_setsid(msg: Message) -> None:
    """Start a grandchild in a session of its own (as daemonising libraries do), then return."""
    record("start", msg)
    recorded, wrote = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            record(f"grandchild={os.getpid()}", msg)
            os.write(wrote, b"x")
            os.execvp("sleep", ["sleep", "300"])
        os.read(recorded, 1)  # its pid is in the ledger before it can be reaped and killed
        os._exit(0)  # the grandchild is reparented to the nearest subreaper: the fork server
    os.close(wrote)
    os.close(recorded)
    os.waitpid(child, 0)
    record(f"parent_exited={time.time()}", msg)
    if msg.attributes.get("linger"):
        time.sleep(float(msg.attributes["linger"]))
    record("done", msg)


@task("fd_probe")
def fd_probe(msg: Message) -> None:
    """Record which descriptors a worker holds while running a task."""
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    kinds = []
    for fd in fds:
        try:
            kinds.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    record("fds=" + ",".join(kinds).replace(" ", "_"), msg)


@task("trace_probe")
def trace_probe(msg: Message) -> None:
    """Record the span the task runs in (trace id, name, kind, attributes) and log one event."""
    import json

    import structlog
    from opentelemetry import trace

    span = trace.get_current_span()
    context = span.get_span_context()
    seen = {
        "trace_id": format(context.trace_id, "032x"),
        "name": getattr(span, "name", ""),
        "kind": str(getattr(span, "kind", "")),
        "attributes": dict(getattr(span, "attributes", {}) or {}),
    }
    Path(os.environ["TEST_LEDGER_DIR"], f"trace-{msg.message_id}.json").write_text(json.dumps(seen))
    structlog.get_logger("task").info("task.traced_event", message_id=msg.message_id)
    record("done", msg)


def _stamp(event: str, msg: Message) -> None:
    record(f"{event}={time.time():.6f}", msg)


@task("capped", concurrency=2)
def capped(msg: Message) -> None:
    """At most 2 at once on a host, whatever workers.concurrency is."""
    _stamp("capped_start", msg)
    time.sleep(0.3)
    _stamp("capped_end", msg)


@task("short_timeout", timeout=1)
def short_timeout(msg: Message) -> None:
    """Its own 1 s timeout, under a global task_timeout of 60 s."""
    record("start", msg)
    time.sleep(float(msg.attributes.get("seconds", "5")))
    record("done", msg)


@task("cleanup_on_cancel", timeout=1)
def cleanup_on_cancel(msg: Message) -> None:
    """Catches the cancellation at its timeout and cleans up, then lets it end the task."""
    from consumerd import TaskCancelled

    record("start", msg)
    try:
        time.sleep(30)
    except TaskCancelled:
        record("cleaned", msg)
        raise


@task("fast_retry_once", min_backoff=0, max_backoff=0)
def fast_retry_once(msg: Message) -> None:
    if _first_run(msg):
        raise ValueError("once")
    record("done", msg)


@task("crash_twice_max", max_attempts=2, min_backoff=0, max_backoff=1)
def crash_twice_max(msg: Message) -> None:
    record("start", msg)
    os._exit(4)


# -- issue 11: async and batch task shapes -------------------------------------------------------


@task("aio_sleep")
async def aio_sleep(msg: Message) -> None:
    """An I/O-bound task: many of these run at once on one worker's event loop."""
    import asyncio

    record("start", msg)
    await asyncio.sleep(float(msg.attributes.get("seconds", "0.5")))
    record("done", msg)


@task("aio_sleep_once")
async def aio_sleep_once(msg: Message) -> None:
    """Sleeps long on its first run only (a sibling caught in a worker's kill), then is quick."""
    import asyncio

    if _first_run(msg):
        await asyncio.sleep(30)
    record("done", msg)


@task("aio_raise_once")
async def aio_raise_once(msg: Message) -> None:
    if _first_run(msg):
        raise ValueError("async failure, first run only")
    record("done", msg)


@task("aio_hang_once", timeout=1)
async def aio_hang_once(msg: Message) -> None:
    """Hangs past its 1 s timeout on the first run; notes the cancellation and lets it through."""
    import asyncio

    if _first_run(msg):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            record("cancelled", msg)
            raise
    record("done", msg)


@task("aio_stubborn_once", timeout=1)
async def aio_stubborn_once(msg: Message) -> None:
    """Ignores every cancellation on its first run: its worker has to be killed."""
    import asyncio

    if _first_run(msg):
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                record("ignored", msg)
    record("done", msg)


@task("rows", batch_size=5, batch_wait=0.5)
def rows(msgs: list[Message]) -> object:
    """A batch task: `fail=retry` retries that message once, `fail=reject` rejects it."""
    from consumerd import BatchResult

    result = BatchResult()
    for msg in msgs:
        record(f"batch={len(msgs)}", msg)
        kind = msg.attributes.get("fail")
        if kind == "retry" and _first_run(msg):
            result.retry(msg, after=0, reason="partial failure, first run only")
        elif kind == "reject":
            record("start", msg)
            result.reject(msg, "this one never will")
        else:
            if kind != "retry":
                record("start", msg)
            record("done", msg)
    return result


@task("aio_rows", batch_size=10, batch_wait=0.3)
async def aio_rows(msgs: list[Message]) -> None:
    import asyncio

    await asyncio.sleep(0.05)
    for msg in msgs:
        record(f"batch={len(msgs)}", msg)
        record("done", msg)


@task("rows_raise", batch_size=3, batch_wait=0.2)
def rows_raise(msgs: list[Message]) -> None:
    """Raising fails the whole batch (the first time its first message runs)."""
    first = runs_so_far(msgs[0]) == 0
    for msg in msgs:
        record("start", msg)
    if first:
        raise RuntimeError("the whole batch fails")
    for msg in msgs:
        record("done", msg)


@task("slow_exit_once")
def slow_exit_once(msg: Message) -> None:
    """Runs a moment (jobs queue up behind it), then its worker dies, on the first run only."""
    if _first_run(msg):
        time.sleep(0.5)
        os._exit(3)
    record("done", msg)


@task("snoop")
def snoop(msg: Message) -> None:
    """What task code can reach of the daemon: its variables, and the supervisor's environ and mem."""
    for name in ("CREDENTIALS_DIRECTORY", "GOOGLE_APPLICATION_CREDENTIALS", "NOTIFY_SOCKET", "WATCHDOG_USEC", "CONSUMERD_METRICS__LISTEN"):
        record(f"env:{name}:{'seen' if name in os.environ else 'absent'}", msg)
    with open(f"/proc/{os.getppid()}/stat") as stat:  # the fork server's parent: the supervisor
        supervisor = int(stat.read().rsplit(")", 1)[1].split()[1])
    for what in ("environ", "mem"):
        try:
            with open(f"/proc/{supervisor}/{what}", "rb") as handle:
                handle.read(1) if what == "environ" else None
            record(f"opened:{what}", msg)
        except OSError as exc:
            record(f"denied:{what}:{type(exc).__name__}", msg)
    # The LoadCredential= directory, by its well-known path (the variable naming it is gone).
    try:
        with open("/run/credentials/consumerd.service/probe") as credential:
            credential.read()
        record("opened:credential", msg)
    except OSError as exc:
        record(f"denied:credential:{type(exc).__name__}", msg)
    record("done", msg)

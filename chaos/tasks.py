"""The soak's task. Each message's `fate` attribute says how its first run misbehaves; later runs
succeed (a `reject` never does). Every run appends `message_id attempt pid event` to the ledger
(CHAOS_LEDGER, with a wall-clock time), a file the daemon does not own: `start` before the work,
`success` just before returning, `reject` before raising Reject. A run that crashes leaves only its `start`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from consumerd import Message, Reject, task

FATES = {  # fate: share of messages
    "ok": 0.76,
    "slow": 0.02,  # longer than the ack deadline: the lease must be renewed
    "raise": 0.04,
    "exit": 0.03,  # os._exit(1)
    "sigkill": 0.03,  # SIGKILLs itself
    "segfault": 0.02,  # ctypes.string_at(0)
    "hang": 0.02,  # past task_timeout
    "alloc": 0.02,  # allocates ~300 MB, then succeeds
    "reject": 0.02,
    "fork": 0.04,  # leaves a child process behind, then succeeds
}


def _ledger_line(msg: Message, event: str) -> None:
    line = f"{msg.message_id} {msg.delivery_attempt or 0} {os.getpid()} {event} {time.time():.3f}\n".encode()
    fd = os.open(os.environ["CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _first_run(msg: Message) -> bool:
    try:
        with open(os.environ["CHAOS_LEDGER"], "rb") as handle:
            needle = f"{msg.message_id} ".encode()
            starts = sum(1 for line in handle if line.startswith(needle) and b" start " in line)
    except FileNotFoundError:
        starts = 0
    return starts <= 1  # this run's own start is already written


@task("chaos")
def chaos(msg: Message) -> None:
    _ledger_line(msg, "start")
    fate = msg.attributes.get("fate", "ok")
    if fate == "reject":
        _ledger_line(msg, "reject")
        raise Reject("chaos: rejected on purpose")
    if fate != "ok" and _first_run(msg):
        misbehave(fate)
    _ledger_line(msg, "success")


def misbehave(fate: str) -> None:
    if fate == "slow":
        time.sleep(float(os.environ.get("CHAOS_SLOW_SECONDS", "12")))
    elif fate == "raise":
        raise RuntimeError("chaos: raised on purpose")
    elif fate == "exit":
        os._exit(1)
    elif fate == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fate == "segfault":
        ctypes.string_at(0)
    elif fate == "hang":
        time.sleep(3600)
    elif fate == "alloc":
        block = bytearray(300 * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])
    elif fate == "fork":
        if os.fork() == 0:  # a child that would outlive the task: its process group is swept
            time.sleep(3600)
            os._exit(0)

"""The soak's task. Each message's `fate` attribute says how its first run misbehaves; later runs
succeed (a `reject` never does). Every run records itself in the ledger (chaos/ledger.py), with the
subscription it was delivered from: `start` before the work, `success` just before returning, `reject`
before raising Reject. A run that crashes leaves only its `start`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time

from chaos.ledger import Mark, record, runs_started
from consumerd import BatchResult, Message, Reject, task

SHAPES = {"chaos": 0.7, "chaos_async": 0.15, "chaos_batch": 0.15}  # task: share of messages

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
ASYNC_FATES = {  # for the async def task: its coroutines share a worker
    "ok": 0.78,
    "slow": 0.02,
    "raise": 0.04,
    "hang": 0.04,  # past its timeout: cancelled, retried, the worker lives on
    "stubborn": 0.02,  # ignores the cancellation: its worker is killed, its siblings retried
    "exit": 0.03,
    "sigkill": 0.03,
    "reject": 0.04,
}
BATCH_FATES = {  # for the batch task (10 per call): one message's fate is its batch's
    "ok": 0.80,
    "slow": 0.02,
    "raise": 0.04,  # the whole batch fails
    "partial": 0.06,  # only this message fails (BatchResult)
    "exit": 0.03,  # the worker dies: the whole batch crashed
    "sigkill": 0.02,
    "reject": 0.03,  # only this message is rejected
}
FATES_OF = {"chaos": FATES, "chaos_async": ASYNC_FATES, "chaos_batch": BATCH_FATES}


def _first_run(msg: Message) -> bool:
    return runs_started(msg) <= 1  # this run's own start is already recorded


def _begin(msg: Message) -> str | None:
    """Record the start; a reject raises here; returns the fate to act out now, if any."""
    record(msg, Mark.START)
    fate = msg.attributes.get("fate", "ok")
    if fate == "reject":
        record(msg, Mark.REJECT)
        raise Reject("chaos: rejected on purpose")
    return fate if fate != "ok" and _first_run(msg) else None


@task("chaos")
def chaos(msg: Message) -> None:
    if fate := _begin(msg):
        misbehave(fate)
    record(msg, Mark.SUCCESS)


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


@task("chaos_async")
async def chaos_async(msg: Message) -> None:
    if fate := _begin(msg):
        if fate == "hang":
            await asyncio.sleep(3600)
        elif fate == "stubborn":
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        elif fate == "slow":
            await asyncio.sleep(float(os.environ.get("CHAOS_SLOW_SECONDS", "12")))
        else:
            misbehave(fate)
    record(msg, Mark.SUCCESS)


@task("chaos_batch", batch_size=10, batch_wait=0.2)
def chaos_batch(msgs: list[Message]) -> BatchResult:
    for msg in msgs:
        record(msg, Mark.START)
    first = {m.message_id: _first_run(m) for m in msgs}
    fates = {m.message_id: m.attributes.get("fate", "ok") for m in msgs}
    for fate in ("slow", "raise", "exit", "sigkill"):  # what happens to one happens to its whole batch
        if any(f == fate and first[mid] for mid, f in fates.items()):
            misbehave(fate)
    result = BatchResult()
    for msg in msgs:
        fate = fates[msg.message_id]
        if fate == "reject":
            record(msg, Mark.REJECT)
            result.reject(msg, "chaos: rejected on purpose")
        elif fate == "partial" and first[msg.message_id]:
            result.fail(msg, RuntimeError("chaos: this message of the batch failed"))
        else:
            record(msg, Mark.SUCCESS)
    return result

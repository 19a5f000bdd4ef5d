"""The pool answers "which worker can take this call": room, half-full queues, reservation."""

import socket

from consumerd.ipc.held import InFlight
from consumerd.ipc.records import ForkServerSpec
from consumerd.message import Message
from consumerd.pool.handles import Mode, WorkerHandle
from consumerd.pool.pool import Pool


def pool_of(n: int) -> tuple[Pool, list[WorkerHandle], list[socket.socket]]:
    pool = Pool(ForkServerSpec(sys_path=(), modules=(), log_format="json", log_level="info", max_tasks_per_child=0), n, lambda _s: None)
    ends = []
    for pid in range(1, n + 1):
        ours, theirs = socket.socketpair()
        ends += [ours, theirs]
        pool.workers[pid] = WorkerHandle(pid, pid, ours)  # what `_adopt` does for a spawned worker
    return pool, list(pool.workers.values()), ends


def give(pool: Pool, worker: WorkerHandle, mode: Mode, n: int = 1) -> None:
    for i in range(n):
        message = Message(f"{worker.pid}-{i}-{mode}", b"", {}, None, None, "", "projects/p/subscriptions/s")
        pool.assign(worker, [InFlight(f"ack-{message.message_id}", message, "t", 1, 0.0)], mode, 30.0, 0.0)


def test_pick_takes_the_worker_with_the_most_room_and_skips_half_full_queues():
    pool, (a, b), ends = pool_of(2)
    give(pool, a, Mode.SYNC, 5)  # room for 3 of 8: more than half full, refilled later in bulk
    assert pool.pick(Mode.SYNC, depth=8) is b
    give(pool, b, Mode.SYNC, 4)  # room for 4 of 8: may take more
    assert pool.pick(Mode.SYNC, depth=8) is b
    give(pool, b, Mode.SYNC, 1)
    assert pool.pick(Mode.SYNC, depth=8) is None
    for end in ends:
        end.close()


def test_a_sync_call_that_finds_no_worker_reserves_the_least_busy_async_one():
    pool, (a, b), ends = pool_of(2)
    give(pool, a, Mode.ASYNC, 5)
    give(pool, b, Mode.ASYNC, 2)
    assert pool.pick(Mode.SYNC, depth=1, reserve=False) is None
    assert (a.reserved, b.reserved) == (None, None)
    assert pool.pick(Mode.SYNC, depth=1, reserve=True) is None
    assert (a.reserved, b.reserved) == (None, Mode.SYNC)
    assert pool.pick(Mode.ASYNC, depth=10) is a  # the reserved worker takes no more coroutines
    pool.pick(Mode.SYNC, depth=1, reserve=True)
    assert a.reserved is None  # one reservation at a time
    for end in ends:
        end.close()

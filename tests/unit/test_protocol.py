"""What a worker or the fork server sends is data in a fixed schema: never code, never a crash."""

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import pytest

from consumerd.errors import WorkerProtocolError
from consumerd.ipc.records import (
    MAX_ERROR_CHARS,
    Exited,
    Outcome,
    PreloadFailed,
    Ready,
    Result,
    Spawn,
    Spawned,
    TaskOptions,
    decode_control,
    encode_control,
)
from consumerd.pool.pool import ForkServerDied, Pool


class Boom:
    """Unpickling this would run code in the supervisor (the attack a task could mount)."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/consumerd-pwned",))


def test_a_pickle_frame_from_a_worker_is_rejected_without_running_it(tmp_path):
    payload = pickle.dumps(Boom())
    with pytest.raises(WorkerProtocolError, match="undecodable"):
        Result.decode(payload)
    assert not os.path.exists("/tmp/consumerd-pwned")


def test_results_round_trip_and_every_field_is_validated():
    result = Result(5, Outcome.RETRY, 0.25, "later", 3.5)
    assert Result.decode(result.encode()) == result
    assert Result.decode(Result(6, Outcome.SUCCESS, 0.1, over_memory=True).encode()).over_memory is True
    bad_rows = [
        [0, "success", 0.1, "", None, False],  # seq must be positive
        [True, "success", 0.1, "", None, False],  # a bool is not a seq
        [1, "crash", 0.1, "", None, False],  # the supervisor decides crashes, not a worker
        [1, "success", -1, "", None, False],
        [1, "retry", 0.1, "", -2, False],
        [1, "retry", 0.1, "", "5", False],
        [1, "error", 0.1, "x" * (MAX_ERROR_CHARS + 1), None, False],
        [1, "success", 0.1, "", None, 1],  # over_memory is a bool
        [1, "success", 0.1, "", None],
        {"seq": 1},
    ]
    for row in bad_rows:
        with pytest.raises(WorkerProtocolError):
            Result.decode(json.dumps(row).encode())
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(WorkerProtocolError, match="undecodable"):
            Result.decode(b'[1,"retry",0.1,"",' + constant + b",false]")


def test_an_oversized_error_is_cut_to_4_kib_by_the_encoder():
    encoded = Result(1, Outcome.ERROR, 0.1, "é" * 5_000_000).encode()
    assert len(Result.decode(encoded).error) == MAX_ERROR_CHARS


def test_control_packets_round_trip_and_reject_anything_else():
    ready = Ready((("a", TaskOptions()), ("b", TaskOptions(timeout=2.5, concurrency=3, max_attempts=4))))
    for packet in (Spawn(3), ready, PreloadFailed("boom"), Spawned(1, 1234), Exited(1234, 256)):
        assert decode_control(encode_control(packet)) == packet
    for raw in (
        pickle.dumps(("spawned", 1, 2)),
        b'{"kind":"spawned","worker_id":1}',
        b'{"kind":"exec"}',
        b'{"kind":"exited","pid":"1","status":0}',
        b'{"kind":"ready","tasks":[1]}',
    ):
        with pytest.raises(WorkerProtocolError):
            decode_control(raw)


class NoProcess:
    """The fork server's process, when the test itself is the fork server."""

    pid = 0

    def poll(self) -> int:
        return 0

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def _pool_on(ours: socket.socket, theirs: socket.socket) -> Pool:
    """A started pool whose fork server is the test: ``theirs`` is the fork server's end."""
    theirs.send(encode_control(Ready(())))
    pool = Pool(spec=None, size=0, forget=lambda _s: None, launch=lambda _spec: (NoProcess(), ours))  # type: ignore[arg-type]
    pool.start()
    return pool


def test_two_descriptors_where_one_fits_is_a_fork_server_error_not_an_index_error():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pool = _pool_on(ours, theirs)
    r1, w1 = os.pipe()
    socket.send_fds(theirs, [encode_control(Spawned(1, 99))], [r1, w1])
    with pytest.raises(ForkServerDied, match="MSG_CTRUNC"):
        pool.read_control(0.0)
    ours.close(), theirs.close(), os.close(r1), os.close(w1)


def test_a_spawned_packet_arriving_without_its_descriptor_is_a_fork_server_error():
    # Out of file descriptors: the kernel drops the SCM_RIGHTS payload and sets MSG_CTRUNC. The
    # receiver runs in a child with RLIMIT_NOFILE at what it already has open.
    child = textwrap.dedent(
        """
        import os, resource, socket, sys
        from consumerd.pool.pool import ForkServerDied, Pool
        from consumerd.ipc.records import Ready, Spawned, encode_control
        class NoProcess:
            pid = 0
            poll = wait = lambda self, timeout=None: 0
            kill = lambda self: None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.send(encode_control(Ready(())))
        pool = Pool(spec=None, size=0, forget=lambda s: None, launch=lambda spec: (NoProcess(), ours))
        pool.start()
        r, w = os.pipe()
        socket.send_fds(theirs, [encode_control(Spawned(1, 99))], [r])
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            while True:
                os.open("/dev/null", os.O_RDONLY)  # fill every gap below the limit
        except OSError:
            pass
        try:
            pool.read_control(0.0)
        except ForkServerDied as exc:
            print("ForkServerDied:", exc)
            sys.exit(0)
        sys.exit(1)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ForkServerDied" in done.stdout and "IndexError" not in done.stderr


def test_the_supervisor_process_never_imports_task_or_worker_code():
    probe = "import sys, consumerd.cli, consumerd.supervisor.loop; print(sorted(m for m in sys.modules if m.startswith('consumerd')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    loaded = set(eval(out))
    assert {"consumerd.supervisor.loop", "consumerd.pool.pool"} <= loaded
    assert not loaded & {
        "consumerd.worker.forkserver",
        "consumerd.worker.child",
        "consumerd.worker.registry",
        "consumerd.worker.coroutines",
        "consumerd.worker.batch",
    }

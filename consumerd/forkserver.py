"""The fork server: a small process that preloads task modules and forks workers on request.

Started by exec (never by fork) from the supervisor, before or after its gRPC client exists, so it
never inherits a gRPC channel; it never imports grpc itself unless a task module does. Forking a
worker from it costs about a millisecond, so `max_tasks_per_child = 1` stays cheap.

Control protocol on a SOCK_SEQPACKET socket, one pickled tuple per packet:
  supervisor -> here: ("spawn", worker_id)
  here -> supervisor: ("ready", [task names]) | ("error", text)
                      ("spawned", worker_id, pid) with the worker's channel fd attached
                      ("exited", pid, wait_status)
When the supervisor's end closes (it exited or was killed), every worker's process group is killed
and the fork server exits: orphaned workers never keep running unsupervised.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import selectors
import signal
import socket
import sys
from typing import Any

from .errors import ConfigError, ExitCode
from .inbox import drain_fd
from .logsetup import configure_logging, get_logger
from .protocol import ForkServerSpec
from .worker import reset_process_state, serve  # imported here once, not in every forked child

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MAX_PACKET = 64 * 1024


_libc: ctypes.CDLL | None = None


def prctl(option: int, value: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # loaded once, in the fork server: children inherit it
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def send_packet(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


class ForkServer:
    def __init__(self, control: socket.socket, spec: ForkServerSpec) -> None:
        self.control = control
        self.spec = spec
        self.workers: set[int] = set()
        self.registry: Any = None
        self.log = get_logger("consumerd.forkserver")

    def run(self) -> int:
        if not self.preload():
            return int(ExitCode.CONFIG)
        self.install_signal_handlers()
        wake_r = self.wakeup_fd()
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(wake_r, selectors.EVENT_READ, "sigchld")
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "sigchld":
                        drain_fd(wake_r)
                        self.reap()
                    elif not self.handle_request():
                        return 0
        finally:
            self.kill_all()

    def preload(self) -> bool:
        from .registry import load_task_modules

        sys.path[:] = list(self.spec.sys_path)
        try:
            self.registry = load_task_modules(self.spec.modules)
        except ConfigError as exc:
            send_packet(self.control, ("error", str(exc)))
            return False
        send_packet(self.control, ("ready", [spec.name for spec in self.registry.specs()]))
        return True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop via the wake-up fd
        # Orphans of tasks (double-forked daemons) are reparented here and reaped, never zombies.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        reset_process_state  # noqa: B018 - imported above so forked workers need no imports

    @staticmethod
    def wakeup_fd() -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        return wake_r

    def handle_request(self) -> bool:
        try:
            packet = self.control.recv(MAX_PACKET)
        except ConnectionResetError:
            return False
        if not packet:
            return False
        request = pickle.loads(packet)
        if request[0] == "spawn":
            self.spawn(request[1])
        return True

    def spawn(self, worker_id: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            self.become_worker(child_end)  # never returns
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
        except OSError:
            pass
        self.workers.add(pid)
        send_packet(self.control, ("spawned", worker_id, pid), [parent_end.fileno()])
        parent_end.close()
        child_end.close()

    def become_worker(self, sock: socket.socket) -> None:
        code = 70
        try:
            os.setpgid(0, 0)
            my_parent = os.getppid()
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != my_parent:  # the fork server died before prctl took effect
                os._exit(1)
            self.control.close()
            reset_process_state()
            code = serve(sock, self.registry, self.spec.max_tasks_per_child)
        except BaseException:  # noqa: BLE001 - a forked child must never return into the server's loop
            code = 70
        finally:
            os._exit(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                self.workers.discard(pid)
                send_packet(self.control, ("exited", pid, status))

    def kill_all(self) -> None:
        for pid in self.workers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def main() -> int:
    control = socket.socket(fileno=int(sys.argv[1]))
    spec = pickle.loads(control.recv(MAX_PACKET))
    configure_logging(spec.log_format, spec.log_level)
    try:
        return ForkServer(control, spec).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the supervisor went away mid-send


if __name__ == "__main__":
    sys.exit(main())

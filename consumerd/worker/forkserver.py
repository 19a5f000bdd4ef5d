"""The fork server: a small process that preloads task modules and forks workers on request.

Started by exec (never by fork) from the supervisor, with `python -I` and the path of the very
consumerd package the supervisor runs, so neither the environment nor a `consumerd/` directory in
the working directory can replace its code. It never inherits a gRPC channel and never imports
grpc itself unless a task module does. Forking a worker from it is cheap: the task modules are already imported.

Control protocol on a SOCK_SEQPACKET socket, one JSON packet each (`records.ControlPacket`):
  supervisor -> here: Spawn(worker_id)
  here -> supervisor: Ready(tasks, files) | PreloadFailed(error, traceback)
                      Spawned(worker_id, pid) with the worker's channel fd attached
                      Exited(pid, wait_status)
When the supervisor's end closes (it exited or was killed), every worker's process group is killed
and the fork server exits: orphaned workers never keep running unsupervised. It is a subreaper:
a task's double-forked or setsid() grandchild is reparented here, and any child that is not a
worker is killed and reaped within SWEEP_INTERVAL.
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import selectors
import signal
import socket
import sys

from consumerd.adapters import landlock
from consumerd.adapters.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, children_of, kill_group, prctl
from consumerd.adapters.proctitle import set_title, worker_title
from consumerd.errors import ConfigError, ExitCode, TaskCancelled, WorkerProtocolError
from consumerd.ipc.framing import send_packet
from consumerd.ipc.inbox import drain_fd
from consumerd.ipc.records import (
    MAX_PACKET,
    Exited,
    ForkServerSpec,
    Spawn,
    Spawned,
    decode_control,
)
from consumerd.logsetup import configure_logging, get_logger
from consumerd.worker import outputs, tracing
from consumerd.worker.child import reset_process_state, serve  # imported here once, not in every forked child
from consumerd.worker.codefiles import loaded_files, preload_failed, ready_packet

SWEEP_INTERVAL = 0.25  # seconds between looks for escaped grandchildren reparented here


class ForkServer:
    def __init__(self, control: socket.socket, spec: ForkServerSpec) -> None:
        self.control = control
        self.spec = spec
        self.workers: set[int] = set()
        self.registry: object = None
        self.selector = selectors.DefaultSelector()
        self.wake_fds: tuple[int, int] = (-1, -1)
        self.log = get_logger("consumerd.forkserver")

    def run(self) -> int:
        set_title("fork server")
        self.hide_credentials()  # before any task module is imported: import-time code is task code
        if not self.preload():
            return int(ExitCode.CONFIG)
        self.install_signal_handlers()
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_fds[0], selectors.EVENT_READ, "sigchld")
        try:
            while True:
                for key, _ in self.selector.select(SWEEP_INTERVAL):
                    if key.data == "sigchld":
                        drain_fd(self.wake_fds[0])
                    elif not self.handle_request():
                        return 0
                self.reap()
                self.kill_strays()
        finally:
            self.kill_all()

    def preload(self) -> bool:
        from consumerd.worker.registry import load_task_modules

        sys.path[:] = list(self.spec.sys_path)
        before = set(sys.modules)
        try:
            self.registry = load_task_modules(self.spec.modules)
        except ConfigError as exc:
            send_packet(self.control, preload_failed(exc))
            return False
        tracing.configure(self.spec.tracing, self.log)
        outputs.configure(self.spec.publish)
        tasks = tuple((spec.name, spec.options) for spec in self.registry.specs())
        ready, left_out = ready_packet(tasks, loaded_files(before, self.task_modules()))
        if left_out:
            self.log.warning(
                "code.files_not_watched", listed=len(ready.files), left_out=left_out, detail="a reload compares the listed files only"
            )
        send_packet(self.control, ready)
        return True

    def task_modules(self) -> list[str]:
        """The configured modules and those the entry points name: their packages' files are the task code."""
        from consumerd.worker.registry import ENTRY_POINT_GROUP

        return [*self.spec.modules, *(ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))]

    def hide_credentials(self) -> None:
        if not self.spec.hidden_paths:
            return
        result = landlock.hide(self.spec.hidden_paths)
        if isinstance(result, landlock.Hidden):
            self.log.info("workers.credentials_hidden", paths=list(result.paths), rules=result.granted)
        else:
            self.log.warning("workers.credentials_readable", reason=result.reason, paths=list(self.spec.hidden_paths))

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop via the wake-up fd
        # Orphans of tasks (double-forked daemons) are reparented here, then killed and reaped.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        self.wake_fds = (wake_r, wake_w)

    def handle_request(self) -> bool:
        try:
            packet = self.control.recv(MAX_PACKET)
        except ConnectionResetError:
            return False
        if not packet:
            return False
        try:
            request = decode_control(packet)
        except WorkerProtocolError as exc:
            self.log.error("forkserver.bad_request", error=str(exc))
            return False
        if isinstance(request, Spawn):
            self.spawn(request.worker_id)
        return True

    def spawn(self, worker_id: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            self.become_worker(child_end, worker_id)  # never returns
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
        except OSError:
            pass
        self.workers.add(pid)
        send_packet(self.control, Spawned(worker_id, pid), [parent_end.fileno()])
        parent_end.close()
        child_end.close()

    def become_worker(self, sock: socket.socket, worker_id: int) -> None:
        code = ExitCode.SOFTWARE
        try:
            os.setpgid(0, 0)
            my_parent = os.getppid()
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != my_parent:  # the fork server died before prctl took effect
                os._exit(ExitCode.FAILURE)
            self.close_inherited()
            reset_process_state()
            set_title(worker_title(worker_id))
            code = serve(sock, self.registry, self.spec.max_tasks_per_child, worker_id, self.spec.memory)  # type: ignore[arg-type]
            tracing.flush()
        except TaskCancelled:
            code = ExitCode.TERMINATED
        except BaseException:  # noqa: BLE001 - a forked child must never return into the server's loop
            code = ExitCode.SOFTWARE
        finally:
            os._exit(code)

    def close_inherited(self) -> None:
        """A worker keeps none of the fork server's descriptors: its control socket, selector, wake pipe."""
        signal.set_wakeup_fd(-1)
        self.control.close()
        self.selector.close()
        for fd in self.wake_fds:
            try:
                os.close(fd)
            except OSError:
                pass

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
                send_packet(self.control, Exited(pid, status))

    def kill_strays(self) -> None:
        """Kill every child that is not a worker: a task's grandchild that escaped its process group."""
        strays = [pid for pid in children_of(os.getpid()) if pid not in self.workers]
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.log.warning("task.escaped_child_killed", pid=pid)
        if strays:
            self.reap()

    def kill_all(self) -> None:
        for pid in self.workers:
            kill_group(pid, signal.SIGKILL)
        self.workers.clear()
        self.kill_strays()


def main() -> int:
    control = socket.socket(fileno=int(sys.argv[1]))
    spec = pickle.loads(control.recv(MAX_PACKET))  # from the supervisor, which is trusted
    configure_logging(spec.log_format, spec.log_level, project=spec.project)
    try:
        return ForkServer(control, spec).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the supervisor went away mid-send


if __name__ == "__main__":
    sys.exit(main())

"""Which generation of task code takes new jobs: the succession of fork servers.

One generation is current. A reload's new code starts a second one (`begin`) that loads beside it;
once it is ready and wanted (`promote`) it becomes current and the old one finishes: its workers take
no new job, finish what they run on the old code and exit, and then its fork server is told to stop
(`GenerationRetired`). New code that fails to load (`GenerationFailed`) changes nothing. Every fork
server's channel is behind one descriptor (`fileno`): the supervisor watches one, however many.
"""

from __future__ import annotations

import itertools
import selectors
import subprocess
import time
from collections.abc import Callable, Iterator

from consumerd.errors import ConsumerdError
from consumerd.ipc.records import ForkServerSpec
from consumerd.pool.generation import ForkServerDied, Generation, GenerationStatus, Launch, ServerProcess, Stage
from consumerd.pool.handles import GenerationFailed, GenerationRetired, PoolEvent, WorkerHandle, WorkerStarted

STOP_GRACE = 5.0  # seconds a fork server told to stop may take to exit before SIGKILL


class Succession:
    def __init__(self, launch: Launch, close: Callable[[WorkerHandle], None]) -> None:
        self._launch = launch
        self._close = close  # closes a worker's channel (the pool's, which tells the caller's selector)
        self.current: Generation | None = None
        self.starting: Generation | None = None  # a reload's new code, loading (or loaded, not promoted yet)
        self.finishing: list[Generation] = []  # replaced: their workers finish what they run
        self._stopping: list[tuple[ServerProcess, float]] = []  # told to stop, and when SIGKILL follows
        self._controls = selectors.DefaultSelector()  # every fork server's channel, behind one descriptor
        self._numbers = itertools.count(1)
        self.stopped = False

    def fileno(self) -> int:
        return self._controls.fileno()

    @property
    def loading(self) -> bool:
        """New code is on its way: the current workers get nothing queued behind a running job."""
        return self.starting is not None

    def first(self, spec: ForkServerSpec, workers: dict[int, WorkerHandle], timeout: float) -> object:
        """Start the first generation (its workers go in ``workers``) and wait for its reply: its
        `Ready`, or `PreloadFailed`. Start-up only: nothing else runs yet."""
        gen = self._generation(spec, time.monotonic())
        gen.stage, gen.workers, self.current = Stage.CURRENT, workers, gen
        return gen.await_ready(timeout)

    def _generation(self, spec: ForkServerSpec, now: float, deadline: float = float("inf")) -> Generation:
        server, control = self._launch(spec)
        gen = Generation(next(self._numbers), spec, server, control, now, deadline)
        self._controls.register(control, selectors.EVENT_READ, gen)
        return gen

    def begin(self, spec: ForkServerSpec, now: float, timeout: float) -> int:
        """Start a fork server for new code beside the current one (one still starting is stopped:
        the newest code wins); its number."""
        self.discard_starting(now)
        self.starting = self._generation(spec, now, now + timeout)
        return self.starting.number

    def discard_starting(self, now: float) -> None:
        """Stop the new code that is loading, or loaded but not wanted (it has no workers yet)."""
        gen, self.starting = self.starting, None
        if gen is not None:
            _kill(gen.server)
            self._stop_server(gen, now)

    def promote(self, now: float) -> list[GenerationRetired]:
        """The starting generation becomes current; the current one finishes: its idle workers close
        now (and exit), its busy ones take no new job and close once they hold none."""
        new, old = self.starting, self.current
        assert new is not None and new.ready and old is not None
        self.starting = None
        new.stage, old.stage = Stage.CURRENT, Stage.FINISHING
        self.current = new
        self.finishing.append(old)
        for worker in list(old.workers.values()):
            worker.retiring = True
            if not worker.slots:
                self._close(worker)
        return [] if old.holds() else [self._retire(old, now, "it had no worker left")]

    def finishing_workers(self) -> Iterator[WorkerHandle]:
        for gen in self.finishing:
            yield from gen.workers.values()

    def statuses(self, now: float) -> list[GenerationStatus]:
        return [g.status(now) for g in (self.starting, self.current, *self.finishing) if g is not None]

    # -- packets ---------------------------------------------------------------------------
    def read(self, now: float) -> list[PoolEvent]:
        """Every fork server that has a packet for us: spawned workers, exit statuses, new code's
        Ready or failure. ForkServerDied only for the current generation's."""
        events: list[PoolEvent] = []
        for key, _ in self._controls.select(0):
            events += self._read(key.data, now)
        return events

    def _read(self, gen: Generation, now: float) -> list[PoolEvent]:
        if gen.closed:
            return []
        try:
            events = gen.read(now, self._close)
        except ForkServerDied as exc:
            if gen is self.current:
                raise
            if gen is self.starting:
                return [self._failed(gen, now, gen.failure or f"the new fork server exited before it was ready: {exc}")]
            return self._lost(gen, now, f"its fork server died: {exc}")
        if gen is self.starting and any(isinstance(e, GenerationFailed) for e in events):
            self.starting = None
            self._stop_server(gen, now)
        if gen.stage is Stage.FINISHING and not gen.holds():
            events.append(self._retire(gen, now, "its workers finished"))
        return events

    def _failed(self, gen: Generation, now: float, error: str) -> GenerationFailed:
        self.starting = None
        self._stop_server(gen, now)
        return GenerationFailed(gen.number, error)

    def _lost(self, gen: Generation, now: float, reason: str) -> list[PoolEvent]:
        """A replaced generation's fork server died: its workers died with it (PR_SET_PDEATHSIG)."""
        _kill(gen.server)
        events: list[PoolEvent] = [*gen.lost_all(now, self._close, reason)]
        return [*events, self._retire(gen, now, reason)]

    def _retire(self, gen: Generation, now: float, reason: str) -> GenerationRetired:
        if gen in self.finishing:
            self.finishing.remove(gen)
        self._stop_server(gen, now)
        return GenerationRetired(gen.number, reason)

    def _stop_server(self, gen: Generation, now: float) -> None:
        """Close its channel (it kills what is left of its workers and exits); reaped later."""
        if not gen.closed:
            self._controls.unregister(gen.control)
            gen.close()
            self._stopping.append((gen.server, now + STOP_GRACE))

    # -- timers ----------------------------------------------------------------------------
    def escalate(self, now: float) -> None:
        """New code that did not load in time is killed (its channel closes: `read` reports it
        failed); a fork server told to stop is reaped, or killed past its grace."""
        gen = self.starting
        if gen is not None and not gen.ready and not gen.failure and now >= gen.deadline:
            gen.failure = f"the new code did not load within {gen.deadline - gen.started_at:.0f}s"
            _kill(gen.server)
        for entry in list(self._stopping):
            server, kill_at = entry
            if server.poll() is not None:
                self._stopping.remove(entry)
            elif now >= kill_at:
                _kill(server)

    def deadlines(self) -> list[float]:
        due = [kill_at for _, kill_at in self._stopping]
        if self.starting is not None and not self.starting.ready:
            due.append(self.starting.deadline)
        return due

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float, linger: float) -> None:
        """The workers' channels are closed: wait up to ``linger`` seconds for their exits, then
        stop every fork server (each kills what is left of its workers) and reap it."""
        self.stopped = True
        now = time.monotonic()
        self.discard_starting(now)
        self._await_exits(linger)
        for gen in [g for g in (self.current, *self.finishing) if g is not None]:
            self._stop_server(gen, now)
        self.finishing.clear()
        for server, _ in self._stopping:
            try:
                server.wait(timeout)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        self._stopping.clear()
        self._controls.close()

    def _await_exits(self, linger: float) -> None:
        deadline = time.monotonic() + linger
        try:
            while self._waiting() and (remaining := deadline - time.monotonic()) > 0:
                if not self._controls.select(remaining):
                    return
                for event in self.read(time.monotonic()):
                    if isinstance(event, WorkerStarted):  # spawned just before the stop: it exits too
                        self._close(event.worker)
        except (OSError, ConsumerdError):
            pass  # a fork server is gone, or the time is up: each kills the rest

    def _waiting(self) -> bool:
        return any(g.workers and not g.closed for g in (self.current, *self.finishing) if g is not None)


def _kill(server: ServerProcess) -> None:
    try:
        server.kill()
    except OSError:
        pass  # gone already

"""The supervisor's collaborators, built in one place: the real ones here, fakes in the tests.

Nothing here starts a thread, a process or a connection: `Supervisor.run` starts them in order and
pushes each one's stop onto one `ExitStack`, so shutdown stops exactly what was started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Callable

from structlog.stdlib import BoundLogger

from consumerd.adapters.pubsub.acker import Acker
from consumerd.adapters.pubsub.client import PubSub, is_transient
from consumerd.adapters.pubsub.forwarder import Forwarder
from consumerd.adapters.pubsub.publisher import OutputPublisher
from consumerd.adapters.pubsub.puller import Puller
from consumerd.config import Settings
from consumerd.ipc.inbox import Inbox
from consumerd.ipc.records import ForkServerSpec
from consumerd.pool.pool import Pool


@dataclasses.dataclass
class IoThreads:
    """The threads that talk to Pub/Sub for the loop, which never blocks on an RPC."""

    puller: Puller
    acker: Acker
    forwarder: Forwarder | None  # with [dead_letter] topic
    publisher: OutputPublisher | None = None  # with [publish] topics

    def start(self, resources: contextlib.ExitStack, flush_timeout: Callable[[], float], log: BoundLogger) -> None:
        """Start the threads; each one's stop goes on ``resources`` (the acker's flushes first, for
        ``flush_timeout()`` seconds: asked at exit, so a reload's value counts)."""
        for thread in (self.acker, self.forwarder, self.publisher, self.puller):  # stopped in reverse order
            if thread is not None:
                thread.start()
                resources.callback(self._stop, thread, flush_timeout, log)

    def _stop(self, thread: Puller | Acker | Forwarder | OutputPublisher, flush_timeout: Callable[[], float], log: BoundLogger) -> None:
        if thread is self.acker and not self.acker.flush(flush_timeout()):
            log.error("pubsub.flush_timeout", detail="some acks/nacks were not sent; those messages will be redelivered")
        thread.stop()


class Components:
    def pool(self, spec: ForkServerSpec, size: int, forget: Callable[[socket.socket], None]) -> Pool:
        return Pool(spec, size, forget)

    def pubsub(self, settings: Settings) -> PubSub:
        return PubSub(settings.pubsub)

    def io_threads(self, pubsub: PubSub, settings: Settings, inbox: Inbox) -> IoThreads:
        """The threads of the subscription ``settings`` name; their log lines name it."""
        labels = {"subscription": settings.pubsub.subscription_path.rpartition("/")[2]}
        forwarder = None
        if settings.dead_letter.topic:
            topic = settings.pubsub.topic_path(settings.dead_letter.topic)
            forwarder = Forwarder(lambda data, attrs: pubsub.publish(topic, data, attrs), inbox, is_transient, labels=labels)
        publisher = OutputPublisher(pubsub.publish_many, inbox, is_transient, labels=labels) if settings.publish.topics else None
        return IoThreads(
            puller=Puller(pubsub.pull, inbox, is_transient, timeout=settings.pubsub.pull_timeout, labels=labels),
            acker=Acker(pubsub.ack, pubsub.modack, is_transient, labels=labels),
            forwarder=forwarder,
            publisher=publisher,
        )

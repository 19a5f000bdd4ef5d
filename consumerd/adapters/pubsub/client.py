"""The only module that imports google.cloud: pull, ack, modack, subscription checks, publish, setup.

Built on the GAPIC clients with a channel we configure ourselves: no 4 MiB receive limit (a pull of
large messages must never fail and leave them leased), and no library-level retries (the puller and
acker retry with our own backoff, so every attempt is logged and bounded).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.api_core import exceptions as gexc
from google.protobuf import empty_pb2
from google.pubsub_v1 import PublisherClient as GapicPublisher
from google.pubsub_v1 import SubscriberClient as GapicSubscriber
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport
from google.pubsub_v1.types import pubsub as types

from consumerd.adapters.pubsub import credentials
from consumerd.config import PubSubSettings
from consumerd.errors import ConfigError
from consumerd.message import Message

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
]
RPC_TIMEOUT = 30.0  # seconds for admin calls
ACK_TIMEOUT = 5.0  # seconds for ack/modack: a stuck call must not hold back lease renewals for long
ACK_BATCH = 1000  # ack ids per request: well under the request-size limit
EXACTLY_ONCE_FAILURE = "EXACTLY_ONCE_ACKID_FAILURE"

# Errors worth retrying as they are: the service or the network will get better.
TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.Unknown,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.GatewayTimeout,
    gexc.Cancelled,
)
CallError = gexc.GoogleAPICallError


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


@dataclasses.dataclass(frozen=True, slots=True)
class Received:
    ack_id: str
    message: Message


@dataclasses.dataclass(frozen=True)
class SubscriptionInfo:
    path: str
    topic: str
    ack_deadline: int
    dead_letter_topic: str
    max_delivery_attempts: int
    exactly_once: bool
    ordering: bool


class RpcCounter:
    """RPCs by method, for status, logs and benchmarks. Updated from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"pull": 0, "ack": 0, "modack": 0}
        self.errors: dict[tuple[str, str], int] = {}  # (method, gRPC status name) -> failures

    def add(self, method: str) -> None:
        with self._lock:
            self.counts[method] = self.counts.get(method, 0) + 1

    def error(self, method: str, code: str) -> None:
        with self._lock:
            self.errors[(method, code)] = self.errors.get((method, code), 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.counts), dict(self.errors)


class _HotPath:
    """Raw gRPC stubs for pull, ack and modack on the subscriber's channel.

    The GAPIC methods convert every request and response through proto-plus and a logging
    interceptor: more CPU than the call itself when messages are many, and CPU the supervisor's
    loop then waits for on the GIL. Errors are mapped to the same
    google.api_core exceptions the GAPIC methods raise.
    """

    def __init__(self, channel: grpc.Channel, subscription: str, rpcs: RpcCounter) -> None:
        self.rpcs = rpcs
        self.metadata = (("x-goog-request-params", f"subscription={subscription}"),)

        def stub(method: str, request: Any, response: Any) -> grpc.UnaryUnaryMultiCallable:
            return channel.unary_unary(
                f"/google.pubsub.v1.Subscriber/{method}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self.pull = stub("Pull", types.PullRequest.pb(), types.PullResponse.pb())
        self.ack = stub("Acknowledge", types.AcknowledgeRequest.pb(), empty_pb2.Empty)
        self.modack = stub("ModifyAckDeadline", types.ModifyAckDeadlineRequest.pb(), empty_pb2.Empty)

    def call(self, rpc: str, stub: grpc.UnaryUnaryMultiCallable, request: object, timeout: float) -> object:
        self.rpcs.add(rpc)
        try:
            return stub(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            self.rpcs.error(rpc, code.name if code is not None else "UNKNOWN")
            raise gexc.from_grpc_error(exc) from None


class PubSub:
    def __init__(self, settings: PubSubSettings) -> None:
        self.settings = settings
        self.subscription = settings.subscription_path
        self.rpcs = RpcCounter()
        self._subscriber: GapicSubscriber | None = None
        self._publisher: GapicPublisher | None = None
        self._hot: _HotPath | None = None
        self._tls: grpc.ChannelCredentials | None = None
        self._auth: credentials.RememberingPlugin | None = None

    # -- clients ---------------------------------------------------------------------------
    @property
    def subscriber(self) -> GapicSubscriber:
        if self._subscriber is None:
            self._subscriber = GapicSubscriber(transport=SubscriberGrpcTransport(channel=self._channel(SubscriberGrpcTransport)))
        return self._subscriber

    @property
    def hot(self) -> _HotPath:
        if self._hot is None:
            self._hot = _HotPath(self.subscriber.transport.grpc_channel, self.subscription, self.rpcs)  # type: ignore[attr-defined]
        return self._hot

    @property
    def publisher(self) -> GapicPublisher:
        if self._publisher is None:
            self._publisher = GapicPublisher(transport=PublisherGrpcTransport(channel=self._channel(PublisherGrpcTransport)))
        return self._publisher

    def _channel(self, transport: Any) -> grpc.Channel:
        if self.settings.emulator_host:
            return grpc.insecure_channel(self.settings.emulator_host, options=CHANNEL_OPTIONS)
        if self._tls is None:  # one credential (one token, refreshed once) for both clients
            loaded = credentials.load(self.settings.credentials_path(), transport.AUTH_SCOPES)
            self._tls, self._auth = credentials.channel_credentials(loaded, transport.AUTH_SCOPES, transport.DEFAULT_HOST)
        return grpc.secure_channel(self.settings.endpoint, self._tls, options=CHANNEL_OPTIONS)

    def auth_failure(self) -> credentials.AuthFailure | None:
        """Why the last credential refresh failed, if it did (None on the emulator)."""
        return self._auth.failure() if self._auth is not None else None

    def close(self) -> None:
        """Close the channels; a pull in flight is cancelled."""
        for client in (self._subscriber, self._publisher):
            if client is not None:
                client.transport.close()
        self._subscriber = self._publisher = None
        self._hot = None

    # -- subscribing -----------------------------------------------------------------------
    def describe_subscription(self) -> SubscriptionInfo:
        """Raises ConfigError if it does not exist; transient errors propagate for the caller to retry."""
        try:
            sub = self.subscriber.get_subscription(request={"subscription": self.subscription}, timeout=RPC_TIMEOUT, retry=None)
        except gexc.NotFound:
            raise ConfigError(
                f"pubsub.subscription: {self.subscription} does not exist (create it with `consumerd setup`; `run` never creates anything)"
            ) from None
        except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
            raise ConfigError(f"pubsub.subscription: {self.subscription}: access denied: {exc.message}") from None
        return SubscriptionInfo(
            path=sub.name,
            topic=sub.topic,
            ack_deadline=sub.ack_deadline_seconds or 10,
            dead_letter_topic=sub.dead_letter_policy.dead_letter_topic if sub.dead_letter_policy else "",
            max_delivery_attempts=sub.dead_letter_policy.max_delivery_attempts if sub.dead_letter_policy else 0,
            exactly_once=bool(sub.enable_exactly_once_delivery),
            ordering=bool(sub.enable_message_ordering),
        )

    def pull(self, max_messages: int, timeout: float) -> list[Received]:
        """Long-poll: returns as soon as messages are there, or empty after about ``timeout``."""
        hot = self.hot
        request = types.PullRequest.pb()(subscription=self.subscription, max_messages=max_messages)
        response = hot.call("pull", hot.pull, request, timeout)
        return [_received(raw, self.subscription) for raw in response.received_messages]  # type: ignore[attr-defined]

    def ack(self, ack_ids: Sequence[str]) -> dict[str, str]:
        """Acknowledge; return the ack ids that failed individually (exactly-once subscriptions)."""
        hot = self.hot
        failures: dict[str, str] = {}
        for batch in _batches(ack_ids):
            request = types.AcknowledgeRequest.pb()(subscription=self.subscription, ack_ids=batch)
            failures.update(_per_ack_id(functools.partial(hot.call, "ack", hot.ack, request, ACK_TIMEOUT)))
        return failures

    def modack(self, ack_ids: Sequence[str], seconds: int) -> dict[str, str]:
        """Extend (seconds > 0) or give back (seconds = 0: nack) leases; return individual failures."""
        hot = self.hot
        failures: dict[str, str] = {}
        for batch in _batches(ack_ids):
            request = types.ModifyAckDeadlineRequest.pb()(subscription=self.subscription, ack_ids=batch, ack_deadline_seconds=seconds)
            failures.update(_per_ack_id(functools.partial(hot.call, "modack", hot.modack, request, ACK_TIMEOUT)))
        return failures

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish one message now (not batched); return its id. Used for dead letters."""
        self.rpcs.add("publish")
        try:
            response = self.publisher.publish(
                request={"topic": topic, "messages": [{"data": data, "attributes": dict(attributes)}]},
                timeout=RPC_TIMEOUT,
                retry=None,
            )
        except gexc.GoogleAPICallError as exc:
            code = exc.grpc_status_code
            self.rpcs.error("publish", code.name if code is not None else type(exc).__name__)
            raise
        return response.message_ids[0]

    def publish_many(self, topic: str, messages: Sequence[tuple[bytes, Mapping[str, str], str]]) -> list[str]:
        """Publish (data, attributes, ordering key) messages in one request; return their ids."""
        self.rpcs.add("publish")
        request = {"topic": topic, "messages": [{"data": d, "attributes": dict(a), "ordering_key": k} for d, a, k in messages]}
        try:
            response = self.publisher.publish(request=request, timeout=RPC_TIMEOUT, retry=None)
        except gexc.GoogleAPICallError as exc:
            code = exc.grpc_status_code
            self.rpcs.error("publish", code.name if code is not None else type(exc).__name__)
            raise
        return list(response.message_ids)

    def topic_exists(self, topic: str) -> bool:
        try:
            self.publisher.get_topic(request={"topic": topic}, timeout=RPC_TIMEOUT, retry=None)
        except gexc.NotFound:
            return False
        return True

    # -- publishing and setup (CLI) --------------------------------------------------------
    def batch_publisher(self, ordered: bool = False) -> pubsub_v1.PublisherClient:
        """The library's batching publisher, on our channel options (ordered: honours ordering keys)."""
        # Imported here: the daemon never needs it, and it would grow the supervisor's memory (it
        # brings the streaming subscriber and OpenTelemetry with it).
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=ordered),
            transport=PublisherGrpcTransport(channel=self._channel(PublisherGrpcTransport)),
        )

    def ensure_topic(self, topic: str) -> bool:
        """Create the topic if missing; True if it was created."""
        try:
            self.publisher.create_topic(request={"name": topic}, timeout=RPC_TIMEOUT)
            return True
        except gexc.AlreadyExists:
            return False

    def ensure_subscription(
        self,
        topic: str,
        subscription: str,
        ack_deadline: int,
        dead_letter_topic: str = "",
        max_delivery_attempts: int = 0,
    ) -> bool:
        request: dict[str, object] = {"name": subscription, "topic": topic, "ack_deadline_seconds": ack_deadline}
        if dead_letter_topic:
            request["dead_letter_policy"] = {
                "dead_letter_topic": dead_letter_topic,
                "max_delivery_attempts": max_delivery_attempts,
            }
        try:
            self.subscriber.create_subscription(request=request, timeout=RPC_TIMEOUT)
            return True
        except gexc.AlreadyExists:
            return False


def _per_ack_id(call: Callable[[], object]) -> dict[str, str]:
    """Run an ack/modack; on an exactly-once subscription, return the ack ids that failed with why.

    Such a subscription answers a call with some bad ack ids by INVALID_ARGUMENT whose ErrorInfo
    (reason EXACTLY_ONCE_ACKID_FAILURE) maps each failed ack id to PERMANENT_FAILURE_... or
    TRANSIENT_FAILURE_...; the ack ids it does not list succeeded. Any other error is raised.
    """
    try:
        call()
    except gexc.GoogleAPICallError as exc:
        if getattr(exc, "reason", None) == EXACTLY_ONCE_FAILURE and getattr(exc, "metadata", None):
            return dict(exc.metadata)
        raise
    return {}


def _batches(ack_ids: Sequence[str]) -> list[Sequence[str]]:
    return [ack_ids[i : i + ACK_BATCH] for i in range(0, len(ack_ids), ACK_BATCH)]


def _received(raw: object, subscription: str) -> Received:
    msg = raw.message  # type: ignore[attr-defined]
    publish_time = (
        datetime.datetime.fromtimestamp(msg.publish_time.seconds, tz=datetime.UTC).replace(microsecond=msg.publish_time.nanos // 1000)
        if msg.HasField("publish_time")
        else None
    )
    return Received(
        ack_id=raw.ack_id,  # type: ignore[attr-defined]
        message=Message(
            message_id=msg.message_id,
            data=msg.data,
            attributes=dict(msg.attributes),
            publish_time=publish_time,
            delivery_attempt=raw.delivery_attempt or None,  # type: ignore[attr-defined]
            ordering_key=msg.ordering_key,
            subscription=subscription,
        ),
    )

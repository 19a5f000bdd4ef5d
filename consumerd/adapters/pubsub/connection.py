"""Start-up's first contact with Pub/Sub: the subscription and the topics the daemon publishes to."""

from __future__ import annotations

from collections.abc import Callable

from structlog.stdlib import BoundLogger

from consumerd.adapters.pubsub.client import PubSub, SubscriptionInfo, is_transient
from consumerd.config import Settings
from consumerd.errors import ConfigError, ConsumerdError, PubSubUnavailable
from consumerd.policy.backoff import Backoff


def connect(
    pubsub: PubSub,
    settings: Settings,
    clock: Callable[[], float],
    wait_or_stop: Callable[[float], bool],
    log: BoundLogger,
) -> SubscriptionInfo | None:
    """Describe the subscription, retrying while Pub/Sub is unreachable for up to ``startup_timeout``.

    None when ``wait_or_stop`` reports a stop request while waiting; PubSubUnavailable after the
    timeout; ConfigError (not retried) when the subscription or the dead-letter topic does not
    exist, a [publish] topic does not, or access is denied.
    """
    give_up_at = clock() + settings.pubsub.startup_timeout
    backoff = Backoff(base=0.5, cap=5.0)
    attempt = 0
    while True:
        try:
            info = pubsub.describe_subscription()
            break
        except ConsumerdError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried, then reported as unavailable
            attempt += 1
            auth = pubsub.auth_failure()
            if auth is not None and auth.permanent:
                raise ConfigError(f"pubsub credentials refused by the token endpoint: {auth.error}") from None
            if not is_transient(exc) or clock() >= give_up_at:
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                raise PubSubUnavailable(
                    f"Pub/Sub unreachable for {pubsub.subscription} after {attempt} attempts "
                    f"(pubsub.startup_timeout): {type(exc).__name__}: {first_line}"[:500]
                ) from None
            delay = backoff.delay(attempt)
            log.warning(
                "pubsub.unreachable",
                error=type(exc).__name__,
                **({"auth_error": auth.error} if auth is not None else {}),
                attempt=attempt,
                retry_in_s=round(delay, 2),
            )
            if wait_or_stop(delay):
                return None
    dead_letter_topic = settings.dead_letter.topic and settings.pubsub.topic_path(settings.dead_letter.topic)
    if dead_letter_topic and not pubsub.topic_exists(dead_letter_topic):
        raise ConfigError(f"dead_letter.topic: {dead_letter_topic} does not exist")
    for topic in settings.publish.topics:
        if not pubsub.topic_exists(settings.pubsub.topic_path(topic)):
            raise ConfigError(f"publish.topics: {settings.pubsub.topic_path(topic)} does not exist")
    log.info(
        "pubsub.subscribed",
        path=info.path,
        ack_deadline=info.ack_deadline,
        dead_letter=bool(info.dead_letter_topic),
        exactly_once=info.exactly_once,
        ordering=info.ordering,
    )
    return info

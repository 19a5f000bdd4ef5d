"""Google credentials for the TLS channel: loaded at start-up, and why they failed, as a type.

google-auth adds the credential to every RPC from a gRPC metadata plugin. When that plugin fails
(a deleted key the token endpoint refuses with ``invalid_grant``), gRPC reports the RPC as plain
UNAVAILABLE and logs the plugin's traceback: the daemon would retry a permanent failure as an
outage until ``pubsub.startup_timeout`` and then exit 69, with the cause buried in a traceback.
``RememberingPlugin`` keeps the last failure so the caller can tell a refusal (a config error,
exit 78) from a token endpoint that is merely unreachable (retried).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import grpc

from consumerd.errors import ConfigError

PUBSUB_SCOPE = "https://www.googleapis.com/auth/pubsub"


@dataclasses.dataclass(frozen=True)
class AuthFailure:
    error: str  # one line: the exception type and its first line
    permanent: bool  # the token endpoint refused (not retryable): more attempts cannot help


def load(path: Path | None, default_scopes: tuple[str, ...]) -> Any:
    """The key file's credentials, else Application Default Credentials; ConfigError if unusable.

    Loaded here rather than left to the transport so that a missing or corrupt key is a config
    error at start-up instead of an RPC that fails as "unavailable" on every attempt.
    """
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.oauth2 import service_account

    if path is None:
        try:
            credentials, _ = google.auth.default(default_scopes=list(default_scopes))
        except auth_exceptions.DefaultCredentialsError as exc:
            raise ConfigError(f"Application Default Credentials: {first_line(exc)} (or set pubsub.credentials_file)") from None
        return credentials
    try:
        return service_account.Credentials.from_service_account_file(str(path), scopes=[PUBSUB_SCOPE])
    except FileNotFoundError:
        raise ConfigError(f"pubsub.credentials_file: {path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"pubsub.credentials_file: {path}: not readable") from None
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"pubsub.credentials_file: {path}: not a usable service-account key: {first_line(exc)}") from None


class RememberingPlugin(grpc.AuthMetadataPlugin):
    """google-auth's plugin, which remembers its last failure instead of raising into gRPC."""

    def __init__(self, credentials: Any, default_host: str) -> None:
        import google.auth.transport.grpc
        import google.auth.transport.requests

        # default_host: google-auth signs self-signed JWTs for https://<default_host>/ (AIP-4111),
        # the audience the service expects whatever endpoint (regional, Private Service Connect) we dial.
        self._inner = google.auth.transport.grpc.AuthMetadataPlugin(
            credentials, google.auth.transport.requests.Request(), default_host=default_host
        )
        self._lock = threading.Lock()
        self._failure: AuthFailure | None = None

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            self._inner(context, callback)
        except Exception as exc:  # noqa: BLE001 - reported to gRPC (the RPC fails) and kept for the caller
            with self._lock:
                self._failure = AuthFailure(f"{type(exc).__name__}: {first_line(exc)}", permanent=_refused(exc))
            callback((), exc)
        else:
            with self._lock:
                self._failure = None

    def failure(self) -> AuthFailure | None:
        with self._lock:
            return self._failure


def _refused(exc: BaseException) -> bool:
    from google.auth import exceptions as auth_exceptions

    # A RefreshError the library does not mark retryable is an answer from the token endpoint
    # (invalid_grant: unknown or deleted key, disabled account); a TransportError is the network.
    return isinstance(exc, auth_exceptions.RefreshError) and not exc.retryable


def channel_credentials(
    credentials: Any, default_scopes: tuple[str, ...], default_host: str
) -> tuple[grpc.ChannelCredentials, RememberingPlugin]:
    """TLS (system roots, or GRPC_DEFAULT_SSL_ROOTS_FILE_PATH) plus the credential on every call."""
    import google.auth.credentials

    scoped = google.auth.credentials.with_scopes_if_required(credentials, scopes=None, default_scopes=list(default_scopes))
    plugin = RememberingPlugin(scoped, default_host)
    return grpc.composite_channel_credentials(grpc.ssl_channel_credentials(), grpc.metadata_call_credentials(plugin)), plugin


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]

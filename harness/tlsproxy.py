"""The production path on loopback: a TLS gRPC front for the emulator that checks credentials.

Real users reach Pub/Sub over TLS with an access token or a self-signed JWT on every RPC; the
emulator speaks plaintext and checks nothing. These parts stand in for Google's side, built from
real TLS, real keys and real signatures (nothing is mocked on the daemon's side):

- ``Authority``: a CA made here, and a server certificate for 127.0.0.1 it signed. The daemon
  trusts it through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, as it would trust Google's roots.
- ``ServiceAccount``: a fresh RSA key in Google's service-account JSON format, whose ``token_uri``
  points at the ``TokenEndpoint``.
- ``TokenEndpoint``: OAuth 2.0 JWT-bearer grant (RFC 7523) as oauth2.googleapis.com does it: the
  assertion must be signed by the key, issued by its ``client_email``, for this audience, unexpired.
  Tokens it issues live ``lifetime`` seconds, so a test sees google-auth refresh them.
- ``Proxy``: terminates TLS, accepts a call only with ``authorization: Bearer`` holding a live
  token from the endpoint or a valid self-signed JWT for the Pub/Sub audience, records every call,
  and forwards it to the emulator. A rejected call fails UNAUTHENTICATED, as the service would.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import secrets
import threading
import time
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import jwt

LOOPBACK = "127.0.0.1"
JWT_AUDIENCE = "https://pubsub.googleapis.com/"  # what google-auth signs self-signed JWTs for
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs grant assertions for Google's endpoint whatever the key's token_uri says.
GRANT_AUDIENCE = "https://oauth2.googleapis.com/token"
STREAMING = {"/google.pubsub.v1.Subscriber/StreamingPull"}


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class Authority:
    """A CA and a server certificate for 127.0.0.1, written under ``directory``."""

    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key, server_key = _rsa_key(), _rsa_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consumerd test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        server = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_chain = server.public_bytes(serialization.Encoding.PEM)
        self.server_key = _pem(server_key)


class ServiceAccount:
    """A service-account key file as the IAM console downloads it, for a token endpoint of ours."""

    def __init__(self, path: Path, token_uri: str, project: str = "test-project") -> None:
        key = _rsa_key()
        self.email = f"consumerd-test@{project}.iam.gserviceaccount.com"
        self.key_id = secrets.token_hex(20)
        self.public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.info = {
            "type": "service_account",
            "project_id": project,
            "private_key_id": self.key_id,
            "private_key": _pem(key).decode(),
            "client_email": self.email,
            "client_id": "1" * 21,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        }
        self.path = path
        path.write_text(json.dumps(self.info))
        path.chmod(0o600)

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a JWT this key signed for ``audience``; ValueError if it is not one, or expired."""
        claims: dict[str, Any] = jwt.decode(token, certs={self.key_id: self.public_pem}, audience=audience)
        if claims.get("iss") != self.email:
            raise ValueError(f"issuer {claims.get('iss')!r} is not {self.email}")
        return claims


@dataclasses.dataclass
class Issued:
    token: str
    expires_at: float  # time.time()
    assertion: dict[str, Any]  # the verified claims of the grant that asked for it


class TokenEndpoint:
    """POST /token with a JWT-bearer grant -> an access token living ``lifetime`` seconds."""

    def __init__(self, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self.account: ServiceAccount | None = None
        self.issued: dict[str, Issued] = {}
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self.uri = f"http://{LOOPBACK}:{self._server.server_address[1]}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                status, answer = endpoint.grant(urllib.parse.parse_qs(body))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def grant(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        try:
            if form.get("grant_type") != [JWT_BEARER]:
                raise ValueError(f"unsupported grant_type {form.get('grant_type')}")
            assert self.account is not None, "no service account registered with the endpoint"
            claims = self.account.verify(form["assertion"][0], audience=GRANT_AUDIENCE)
        except (ValueError, KeyError, IndexError) as exc:
            with self._lock:
                self.refused.append(str(exc))
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        token = "ya29.test-" + secrets.token_urlsafe(24)
        with self._lock:
            self.issued[token] = Issued(token, time.time() + self.lifetime, claims)
        return 200, {"access_token": token, "expires_in": self.lifetime, "token_type": "Bearer"}

    def lookup(self, token: str) -> Issued | None:
        with self._lock:
            return self.issued.get(token)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclasses.dataclass(frozen=True)
class Call:
    method: str  # /google.pubsub.v1.Subscriber/Pull
    kind: str  # "token" (issued by the endpoint) | "jwt" (self-signed) | "" (refused)
    credential: str  # the bearer value
    at: float  # time.time() when the call arrived
    refusal: str = ""

    @property
    def name(self) -> str:
        return self.method.rsplit("/", 1)[-1]


class Proxy:
    """TLS on 127.0.0.1:<port>, credentials checked, every call recorded and forwarded upstream."""

    def __init__(self, upstream: str, authority: Authority, tokens: TokenEndpoint) -> None:
        self.tokens = tokens
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(upstream, options=[("grpc.max_receive_message_length", -1)])
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[_Forwarder(self)])
        credentials = grpc.ssl_server_credentials([(authority.server_key, authority.server_chain)])
        self.port = self._server.add_secure_port(f"{LOOPBACK}:0", credentials)
        self.endpoint = f"{LOOPBACK}:{self.port}"
        self._server.start()

    def admit(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Call:
        """Check the call's credential as the service would, and record the verdict."""
        bearer = next((str(v) for k, v in metadata if k == "authorization"), "")
        now = time.time()
        kind, refusal = "", ""
        if not bearer.startswith("Bearer "):
            refusal = "no bearer credential"
        else:
            credential = bearer.removeprefix("Bearer ")
            issued = self.tokens.lookup(credential)
            if issued is not None:
                kind, refusal = ("token", "") if now < issued.expires_at else ("", "token expired")
            else:
                try:
                    assert self.tokens.account is not None
                    self.tokens.account.verify(credential, audience=JWT_AUDIENCE)
                    kind = "jwt"
                except (ValueError, AssertionError) as exc:
                    refusal = f"not a token we issued nor a valid self-signed JWT: {exc}"
        call = Call(method, kind, bearer.removeprefix("Bearer "), now, refusal)
        with self._lock:
            self.calls.append(call)
        return call

    def recorded(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def forward_unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = self.admit(method, context.invocation_metadata())
        if call.refusal:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, call.refusal)
        try:
            response: bytes = self._upstream.unary_unary(method)(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        return response

    def forward_stream(self, method: str, requests: Any, context: grpc.ServicerContext) -> Any:
        call = self.admit(method, context.invocation_metadata())
        if call.refusal:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, call.refusal)
        yield from self._upstream.stream_stream(method)(requests)

    def close(self) -> None:
        self._server.stop(grace=None)
        self._upstream.close()


class _Forwarder(grpc.GenericRpcHandler):
    """Every method, unparsed: requests and responses pass through as bytes."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self.proxy.forward_stream(method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.proxy.forward_unary(method, request, context))


class ProductionPath:
    """CA, key, token endpoint and proxy in ``directory``, in front of the emulator at ``upstream``."""

    def __init__(self, directory: Path, upstream: str, token_lifetime: int = 3600) -> None:
        self.authority = Authority(directory)
        self.tokens = TokenEndpoint(lifetime=token_lifetime)
        self.account = ServiceAccount(directory / "key.json", self.tokens.uri)
        self.tokens.account = self.account
        self.proxy = Proxy(upstream, self.authority, self.tokens)

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint

    def client_env(self) -> dict[str, str]:
        """What a process needs to trust the proxy's certificate."""
        return {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(self.authority.ca_file)}

    def close(self) -> None:
        self.proxy.close()
        self.tokens.close()

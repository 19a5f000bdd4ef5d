"""The path real users take: TLS to the endpoint, a service-account key or ADC, a credential on every RPC.

The emulator sits behind a local TLS proxy (harness.tlsproxy) that checks every call's credential
as the service would: an access token our token endpoint issued and that has not expired, or a
self-signed JWT whose signature verifies with the key's public half. The daemon runs unchanged,
with `[pubsub] endpoint` pointing at the proxy and nothing but GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
telling it to trust the test CA.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.tlsproxy import GRANT_AUDIENCE, JWT_AUDIENCE, ProductionPath, ServiceAccount

pytestmark = pytest.mark.integration
EVERY_RPC = {"GetSubscription", "GetTopic", "Pull", "Acknowledge", "ModifyAckDeadline", "Publish"}


def _start(make_daemon, production: ProductionPath, sub: str, dl_topic: str = "", env: dict[str, str] | None = None, **pubsub: str):
    sections = {"pubsub": {"endpoint": production.endpoint, **pubsub}}
    if dl_topic:
        sections["dead_letter"] = {"topic": dl_topic}
    # PUBSUB_EMULATOR_HOST empty: the daemon takes the production path, TLS with credentials.
    return make_daemon(sub, env={"PUBSUB_EMULATOR_HOST": "", **production.client_env(), **(env or {})}, **sections)


def _publish_every_kind_of_rpc(broker, topic: str, waves: int = 4) -> dict[str, list[str]]:
    """Messages whose handling needs every RPC: pull, ack, nack (a modack) and a dead-letter publish."""
    ids: dict[str, list[str]] = {"ok": [], "raise_once": [], "reject": []}
    ids["raise_once"] += broker.publish(topic, task="raise_once")  # nack with backoff: a modack
    ids["reject"] += broker.publish(topic, task="reject")  # a dead-letter publish
    for wave in range(waves):  # spread over several token lifetimes
        ids["ok"] += broker.publish(topic, 5, task="ok")
        if wave < waves - 1:
            time.sleep(2)
    return ids


def _methods(production: ProductionPath) -> set[str]:
    return {call.name for call in production.proxy.recorded()}


def test_a_key_file_gets_tokens_from_its_token_uri_refreshed_before_expiry_on_every_rpc(broker, topic_sub, make_daemon, production):
    topic, sub = topic_sub()
    dl_topic, _ = topic_sub()
    daemon = _start(make_daemon, production, sub, dl_topic, credentials_file=str(production.account.path))
    daemon.wait_ready()
    ids = _publish_every_kind_of_rpc(broker, topic)
    daemon.wait_for_ids("message.done", set(ids["ok"] + ids["raise_once"]), timeout=60)
    daemon.wait_for_ids("message.dead_lettered", set(ids["reject"]), timeout=30)
    daemon.stop()

    calls = production.proxy.recorded()
    refused = [c for c in calls if c.refusal]
    assert refused == [], f"calls the service would have refused: {refused[:3]}"
    assert {c.kind for c in calls} == {"token"}  # the OAuth token, never a self-signed JWT
    assert _methods(production) >= EVERY_RPC, _methods(production)
    # Every grant was a JWT signed by the key, issued by its client_email, for Google's token audience.
    assert production.tokens.refused == []
    grants = list(production.tokens.issued.values())
    assert all(g.assertion["iss"] == production.account.email and g.assertion["aud"] == GRANT_AUDIENCE for g in grants)
    # Refreshed as it went: several tokens, each used only before it expired, and later ones used.
    used = {c.credential for c in calls}
    assert len(grants) >= 3 and len(used) >= 3, (len(grants), len(used))
    assert all(c.at < production.tokens.issued[c.credential].expires_at for c in calls)
    assert not daemon.select("pubsub.unreachable") and not daemon.select("pubsub.pull_failed")


def test_adc_signs_a_jwt_for_the_pubsub_audience_with_the_key(broker, topic_sub, make_daemon, production):
    topic, sub = topic_sub()
    dl_topic, _ = topic_sub()
    daemon = _start(make_daemon, production, sub, dl_topic, env={"GOOGLE_APPLICATION_CREDENTIALS": str(production.account.path)})
    daemon.wait_ready()
    ids = _publish_every_kind_of_rpc(broker, topic, waves=1)
    daemon.wait_for_ids("message.done", set(ids["ok"] + ids["raise_once"]), timeout=60)
    daemon.wait_for_ids("message.dead_lettered", set(ids["reject"]), timeout=30)
    daemon.stop()

    calls = production.proxy.recorded()
    assert [c for c in calls if c.refusal] == []
    assert {c.kind for c in calls} == {"jwt"} and _methods(production) >= EVERY_RPC
    assert production.tokens.issued == {}  # a self-signed JWT needs no token endpoint
    claims = production.account.verify(calls[-1].credential, audience=JWT_AUDIENCE)
    assert claims["iss"] == claims["sub"] == production.account.email
    assert claims["exp"] - claims["iat"] == 3600 and claims["exp"] > time.time()


def _corrupt(key: Path, into: Path) -> Path:
    info = json.loads(key.read_text())
    pem = info["private_key"]
    info["private_key"] = pem[:200] + "AAAA" + pem[204:]  # base64 still, but not a key any more
    into.write_text(json.dumps(info))
    return into


@pytest.mark.parametrize("via", ["credentials_file", "adc"])
def test_a_corrupt_private_key_is_one_clear_line_and_exit_78(topic_sub, make_daemon, production, tmp_path, via):
    _, sub = topic_sub()
    bad = _corrupt(production.account.path, tmp_path / "corrupt.json")
    if via == "adc":
        daemon = _start(make_daemon, production, sub, env={"GOOGLE_APPLICATION_CREDENTIALS": str(bad)})
    else:
        daemon = _start(make_daemon, production, sub, credentials_file=str(bad))
    assert daemon.wait_exit(30) == 78
    [line] = [line for line in daemon.stderr.splitlines() if line.strip()]
    expected = "pubsub.credentials_file: " if via == "credentials_file" else "Application Default Credentials: "
    assert line.startswith("consumerd: config error: " + expected) and str(bad) in line, line
    assert production.proxy.recorded() == []  # nothing was sent with it


def test_a_key_the_token_endpoint_refuses_is_exit_78_not_retried_as_an_outage(topic_sub, make_daemon, production, tmp_path):
    """A deleted key: it parses and signs, but the token endpoint answers invalid_grant."""
    _, sub = topic_sub()
    deleted = ServiceAccount(tmp_path / "deleted.json", production.tokens.uri)
    daemon = _start(make_daemon, production, sub, credentials_file=str(deleted.path))
    assert daemon.wait_exit(30) == 78
    [line] = [line for line in daemon.stderr.splitlines() if line.strip()]
    assert "credentials refused by the token endpoint: RefreshError: " in line and "invalid_grant" in line, line
    assert len(production.tokens.refused) == 1  # asked once, not once per retry
    assert not daemon.select("pubsub.unreachable")

"""[rate_limit]: where a fleet of daemons shares its rate limits (Redis), and how it shares them without.

The limits themselves are per task: `@task(rate_limit="20/s")` and `[tasks] rate_limits`, whose text
`rate_text` checks here. The grammar is `consumerd.policy.ratelimit.Rate.parse`'s, repeated because
config sits below policy in the layers; `tests/unit/test_ratelimit.py` holds the two to the same
answers.
"""

from __future__ import annotations

import re
import urllib.parse

from pydantic import Field, field_validator

from consumerd.config.section import Section

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")
_PERIODS = {"s": 1, "m": 60, "h": 3600}
_MAX_PER_SECOND = 1_000_000  # records.MAX_RATE_LIMIT
_KEY_PREFIX = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces


def rate_text(text: str) -> str:
    """``text`` when it is a rate such as "20/s", "1.5/s", "600/m" or "100/h"; ValueError otherwise."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(
            f'{text!r} is not a rate: a number of messages per second, minute or hour, such as "20/s", "1.5/s", "600/m" or "100/h"'
        )
    if not 0 < float(match.group(1)) / _PERIODS[match.group(2)] <= _MAX_PER_SECOND:
        raise ValueError(f"{text!r}: a rate must be more than 0 and at most {_MAX_PER_SECOND:g}/s")
    return text


def redis_url(url: str) -> str:
    """``url`` when it names a Redis server: redis://HOST[:PORT][/DB], rediss:// (TLS) or unix:///PATH."""
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.removeprefix("/")
        if not parts.hostname or not port_ok or not (db == "" or db.isdigit()):
            raise ValueError(f"{masked_url(url)!r} is not a Redis address: redis://HOST:PORT/DB (or rediss:// for TLS)")
    elif parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc.rpartition("@")[2]:  # unix://run/x.sock would mean /x.sock
            raise ValueError(f"{masked_url(url)!r} is not a Redis socket: unix:///absolute/path/to/redis.sock")
    else:
        raise ValueError(f"{masked_url(url)!r}: use redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///path/to/redis.sock")
    return url


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ***, for display."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***" if parts.username else ":***"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


class RateLimitSettings(Section):
    redis: str = Field(
        "",
        description="A Redis server that holds the rate limits for the whole fleet: every daemon using it shares each "
        "task's limit (redis://HOST:PORT/DB, rediss:// for TLS, unix:///path/to/redis.sock; a password as in "
        "redis://:PASSWORD@HOST:6379/0, never shown by check-config). Needs the extra: pip install 'consumerd[redis]'. "
        "Empty: each daemon applies its share of the limit alone (limit / `hosts`).",
    )
    hosts: int = Field(
        1,
        ge=1,
        le=10_000,
        description="How many daemons share each rate limit. Without Redis, or while it is unreachable, each daemon "
        "allows its share: the limit divided by this. 1: each daemon applies the whole limit.",
    )
    key_prefix: str = Field(
        "consumerd:rate:",
        description="What the Redis keys start with (then the task name). Daemons with the same prefix on the same "
        "Redis share a limit; give each fleet that must not share one a prefix of its own.",
    )
    timeout: float = Field(
        0.25,
        gt=0,
        le=5,
        description="Seconds Redis has to connect or answer before it counts as unreachable and the daemon falls back "
        "to its share. The supervisor never waits for Redis: meanwhile the task's messages wait, others run.",
    )

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return redis_url(value) if value else value

    @field_validator("key_prefix")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not _KEY_PREFIX.fullmatch(value):
            raise ValueError(f"{value!r}: 1 to 200 printable ASCII characters without spaces")
        return value

"""Fleet-wide rate limits: one GCRA per task in Redis, shared by every daemon that uses the same keys.

`FleetRateLimits` answers the supervisor's loop with the interface of `policy.ratelimit.RateLimits`
(`allow`, `wait_until`, `configure`), but a decision may be remote, and the loop never waits for
Redis: a thread of its own makes every call. When `allow` finds no token it asks the thread for one
and returns False; the thread's answer (`RateAnswer`) comes back through the supervisor's inbox,
which wakes the loop, and the loop hands it to `on_answer`; the next `allow` then takes the token.
A denial says when the next token is due, and `wait_until` returns that time, so a waiting task
costs one call per token it gets, not a poll.

Why a thread and not a call with a few milliseconds' timeout: on a black-holed network a connect
takes the whole timeout on every attempt, and TLS, AUTH and DNS add round trips no socket timeout
bounds; a thread keeps all of that off the loop, at the cost of one wake-up per token (on loopback a
round trip takes about 0.15 ms, ask to answer under a millisecond). It also bounds one task to about
one token per round trip and wake-up per host (about 4,000/s on loopback): far above the limits this is for.

The algorithm (GCRA, the token bucket as times): a key per task holds the theoretical arrival time
(TAT) of the next message; a message may start while ``TAT - tolerance <= now``, and starting one
moves TAT on by one interval. It runs as one Lua script, atomically, with Redis's own clock
(`TIME`): every daemon is judged by one clock, so a host whose clock is ahead or behind can neither
take more than its turn nor starve, and no clock of ours needs to agree with another host's.

Redis unreachable (refused, timed out, any error): each daemon falls back to its share of every limit
(limit / `[rate_limit] hosts`) in a local `RateLimits`, logs `rate_limit.fallback` once, and the thread
pings Redis with backoff until it answers (`rate_limit.restored`). Consuming never stops.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import queue
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from structlog.stdlib import BoundLogger

from consumerd.adapters.prometheus import MetricsSink
from consumerd.errors import ConfigError
from consumerd.ipc.inbox import Inbox
from consumerd.policy.backoff import Backoff
from consumerd.policy.ratelimit import Rate, RateLimits

if TYPE_CHECKING:
    import redis

# KEYS[1]: the task's TAT, in microseconds of Redis's clock. ARGV[1]: the emission interval (us per
# message); ARGV[2]: the burst tolerance (us: (capacity - 1) intervals). {1, 0}: start one now;
# {0, us}: not before that many microseconds.
SCRIPT = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return {0, math.ceil(wait)} end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {1, 0}
"""
GRANT_TTL = 1.0  # seconds a token the thread fetched stays good if no message takes it (it left meanwhile)


class Answer(enum.StrEnum):
    GRANTED = "granted"  # a token for one message of the task: the next `allow` takes it
    DENIED = "denied"  # none before `retry_after` seconds
    UNREACHABLE = "unreachable"  # Redis did not answer: fall back to this host's share
    RESTORED = "restored"  # Redis answers again after an outage


@dataclasses.dataclass(frozen=True)
class RateAnswer:
    """What the thread posts to the supervisor's inbox; the loop passes it to `FleetRateLimits.on_answer`."""

    answer: Answer
    task: str = ""  # "" for UNREACHABLE and RESTORED: they concern every task
    retry_after: float = 0.0  # seconds, with DENIED
    error: str = ""  # with UNREACHABLE


class GcraStore(Protocol):
    """Where the GCRA runs: `RedisGcra`, or a fake in tests."""

    def take(self, key: str, interval: float, tolerance: float) -> float:
        """Start one message now if the key allows it: 0.0, else the seconds until one may start."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class RedisGcra:
    """The only code that imports the Redis client (the optional extra `consumerd[redis]`)."""

    def __init__(self, url: str, timeout: float) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError("rate_limit.redis: needs the Redis client: pip install 'consumerd[redis]'") from None
        self._no_script = redis.exceptions.NoScriptError
        self._sha = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()  # the script's name to EVALSHA
        # No retries of its own (an outage is ours to handle) and no connection until the first call.
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), client_name="consumerd"
        )

    def take(self, key: str, interval: float, tolerance: float) -> float:
        args = (key, f"{interval * 1e6:.3f}", f"{tolerance * 1e6:.3f}")
        try:
            reply: Any = self._client.evalsha(self._sha, 1, *args)
        except self._no_script:  # a restarted or flushed Redis: EVAL sends the script, and caches it again
            reply = self._client.eval(SCRIPT, 1, *args)
        allowed, wait_us = reply
        return 0.0 if allowed else max(int(wait_us), 1) / 1e6

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()


@dataclasses.dataclass(frozen=True)
class _Ask:
    task: str
    interval: float  # seconds between two messages, fleet-wide
    tolerance: float  # seconds: (capacity - 1) intervals


class FleetRateLimits:
    """The rate limits of a fleet, decided in Redis by a thread; this host's share while Redis is away.

    Everything but the thread's `_run` is called from the supervisor's loop only.
    """

    def __init__(
        self,
        store: GcraStore,
        inbox: Inbox,
        metrics: MetricsSink,
        *,
        key_prefix: str = "consumerd:rate:",
        timeout: float = 0.25,
        backoff: Backoff = Backoff(base=0.5, cap=10.0),
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._metrics = metrics
        self._prefix = key_prefix
        self._backoff = backoff
        self._timeout = timeout
        self.answer_deadline = max(2.0, 10 * timeout)  # an ask unanswered this long counts as an outage
        self.log: BoundLogger = structlog.get_logger("consumerd.ratelimit")
        self._rates: dict[str, Rate] = {}  # the fleet's limits
        self._hosts = 1
        self._local = RateLimits()  # this host's shares, while Redis is unreachable
        self._asked: dict[str, float] = {}  # task -> when its ask went to the thread (one at a time)
        self._granted: dict[str, float] = {}  # task -> when a token for it arrived
        self._retry_at: dict[str, float] = {}  # task -> when Redis said the next token is due
        self._fallback_since: float | None = None  # None: Redis decides
        self._asks: queue.SimpleQueue[_Ask | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumerd-ratelimit", daemon=True)

    # -- the loop's side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread: it may be in a call to Redis, which ends within `timeout`."""
        self._stopping.set()
        self._asks.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self._timeout)
        self._store.close()

    def configure(self, limits: Mapping[str, Rate], hosts: int = 1) -> None:
        """The fleet's limits and how many hosts share them (for the fallback), at start-up and on reload."""
        self._rates, self._hosts = dict(limits), hosts
        self._local.configure(limits, hosts)
        for state in (self._asked, self._granted, self._retry_at):
            for task in [t for t in state if t not in self._rates]:
                del state[task]

    def __contains__(self, task: object) -> bool:
        return task in self._rates

    @property
    def falling_back(self) -> bool:
        return self._fallback_since is not None

    def allow(self, task: str, now: float) -> bool:
        """May one message of ``task`` start at ``now``? True takes its token. False: wait for
        `wait_until`, or for an answer through the inbox, whichever comes first."""
        if task not in self._rates:
            return True
        self._notice_silence(now)
        if self._fallback_since is not None:
            return self._local.allow(task, now)
        granted = self._granted.pop(task, None)
        if granted is not None and now - granted <= GRANT_TTL:
            return True
        if task not in self._asked and now >= self._retry_at.get(task, now):
            self._ask(task, now)
        return False

    def wait_until(self, task: str, now: float) -> float | None:
        """The latest time to call `allow` again for ``task`` (``now``: at once); None for a task
        without a limit. While an ask is out, its answer wakes the loop through the inbox sooner."""
        if task not in self._rates:
            return None
        self._notice_silence(now)
        if self._fallback_since is not None:
            return self._local.wait_until(task, now)
        if task in self._granted:
            return now
        if task in self._asked:
            return self._asked[task] + self.answer_deadline
        return max(now, self._retry_at.get(task, now))

    def on_answer(self, answer: RateAnswer, now: float) -> None:
        """Apply what the thread posted to the inbox."""
        if answer.answer is Answer.UNREACHABLE:
            self._fall_back(now, answer.error)
            return
        self._restore(now)  # any answer at all is Redis answering
        if answer.answer is Answer.GRANTED and self._asked.pop(answer.task, None) is not None:
            self._granted[answer.task] = now
        elif answer.answer is Answer.DENIED and self._asked.pop(answer.task, None) is not None:
            self._retry_at[answer.task] = now + answer.retry_after

    def _ask(self, task: str, now: float) -> None:
        rate = self._rates[task]
        interval = 1 / rate.per_second
        self._asked[task] = now
        self._asks.put(_Ask(task, interval, (max(1.0, rate.per_second) - 1) * interval))

    def _notice_silence(self, now: float) -> None:
        if self._fallback_since is None and any(now - asked > self.answer_deadline for asked in self._asked.values()):
            self._fall_back(now, f"no answer within {self.answer_deadline:g}s")

    def _fall_back(self, now: float, error: str) -> None:
        self._asked.clear()
        self._granted.clear()
        if self._fallback_since is not None:
            return  # one log line and one count per outage
        self._fallback_since = now
        shares = {task: str(rate.share(self._hosts)) for task, rate in sorted(self._rates.items())}
        self.log.warning("rate_limit.fallback", error=error, hosts=self._hosts, shares=shares)
        self._metrics.rate_limit_fallback(True)

    def _restore(self, now: float) -> None:
        if self._fallback_since is None:
            return
        self.log.info("rate_limit.restored", after=round(now - self._fallback_since, 3))
        self._fallback_since = None
        self._retry_at.clear()
        self._metrics.rate_limit_fallback(False)

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        if not self._reachable():
            self._await_redis()
        while not self._stopping.is_set() and (ask := self._asks.get()) is not None:
            try:
                wait = self._store.take(self._prefix + ask.task, ask.interval, ask.tolerance)
            except Exception as exc:  # noqa: BLE001 - whatever Redis does, consuming goes on at this host's share
                self._inbox.post(RateAnswer(Answer.UNREACHABLE, error=f"{type(exc).__name__}: {exc}"[:300]))
                self._await_redis()
                continue
            self._inbox.post(RateAnswer(Answer.GRANTED, ask.task) if wait == 0 else RateAnswer(Answer.DENIED, ask.task, wait))

    def _reachable(self) -> bool:
        try:
            self._store.ping()
        except Exception as exc:  # noqa: BLE001 - see _run
            self._inbox.post(RateAnswer(Answer.UNREACHABLE, error=f"{type(exc).__name__}: {exc}"[:300]))
            return False
        return True

    def _await_redis(self) -> None:
        """Drop the asks made before the loop heard of the outage; ping with backoff until Redis answers
        (or `stop`: `_run` then sees `_stopping`, whose None this may have taken)."""
        attempt = 0
        while not self._stopping.is_set():
            while not self._asks.empty():
                if self._asks.get_nowait() is None:
                    return
            attempt += 1
            if self._stopping.wait(self._backoff.delay(attempt)):
                return
            try:
                self._store.ping()
            except Exception:  # noqa: BLE001 - still away: try again later
                continue
            self._inbox.post(RateAnswer(Answer.RESTORED))
            return

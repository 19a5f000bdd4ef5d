"""Rate limits, the pure part: parsing, the token bucket on a fake clock, the per-task table, and where
the limits are declared (`@task`, `[tasks] rate_limits`, the record that crosses the fork server)."""

import random

import pytest

from consumerd.config import Settings
from consumerd.config.ratelimit import rate_text
from consumerd.config.reload import reload_plan
from consumerd.errors import ConfigError, RegistryError, WorkerProtocolError
from consumerd.ipc.records import Ready, TaskOptions, decode_control, encode_control
from consumerd.policy.ratelimit import Rate, RateLimits, TokenBucket, limits_of
from consumerd.worker import registry


# -- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "per_second", "shown"),
    [("20/s", 20, "20/s"), ("1.5/s", 1.5, "1.5/s"), ("600/m", 10, "600/m"), ("100/h", 100 / 3600, "100/h"), (" 3 / m ", 0.05, "3/m")],
)
def test_a_rate_is_a_number_per_second_minute_or_hour(text, per_second, shown):
    rate = Rate.parse(text)
    assert rate.per_second == pytest.approx(per_second) and str(rate) == shown


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0/s", "more than 0"),
        ("0.0/m", "more than 0"),
        ("2000000/s", "at most"),
        ("abc", "not a rate"),
        ("5/d", "not a rate"),
        ("-1/s", "not a rate"),
        ("1e3/s", "not a rate"),
        ("20", "not a rate"),
        ("/s", "not a rate"),
        ("20/S", "not a rate"),
        ("20 per second", "not a rate"),
        ("", "not a rate"),
    ],
)
def test_anything_else_is_a_clear_error(text, problem):
    with pytest.raises(ValueError, match=problem) as err:
        Rate.parse(text)
    assert repr(text) in str(err.value)
    if problem == "not a rate":
        assert '"20/s", "1.5/s", "600/m" or "100/h"' in str(err.value)


def test_the_config_checks_rates_with_the_same_grammar_as_the_policy():
    # config sits below policy in the layers, so it repeats the grammar: both must agree.
    corpus = ["20/s", "1.5/s", "600/m", "100/h", " 7 /h", "1000000/s", "1000001/s", "0/s", "0.5/s", "abc", "5/d", "1e3/s", "20/S", "", "1/"]
    corpus += [f"{random.Random(i).uniform(0, 3):.3f}/{unit}" for i in range(30) for unit in "smhd"]
    for text in corpus:
        try:
            Rate.parse(text)
            policy = ""
        except ValueError as exc:
            policy = str(exc)
        try:
            rate_text(text)
            config = ""
        except ValueError as exc:
            config = str(exc)
        assert policy == config, text


def test_a_rate_in_messages_per_second_reads_back_in_its_best_unit():
    assert [str(Rate.of(Rate.parse(t).per_second)) for t in ("20/s", "1.5/s", "600/m", "100/h", "30/m", "1/h")] == [
        "20/s",
        "1.5/s",
        "10/s",
        "100/h",
        "30/m",
        "1/h",
    ]
    assert Rate.parse("60/m").same_as(Rate.parse("1/s")) and not Rate.parse("61/m").same_as(Rate.parse("1/s"))
    assert Rate.parse("20/s").share(4).per_second == 5


# -- the token bucket ---------------------------------------------------------------------------------
def admit_all(bucket: TokenBucket, n: int, late: float = 0.0, seed: int = 1) -> list[float]:
    """The supervisor's way with n waiting messages: take a token, or sleep until `next_token_at` (waking
    up to ``late`` seconds after it, as a real loop does), and try again. Returns when each started."""
    rand, now, started = random.Random(seed), 0.0, []
    while len(started) < n:
        if bucket.take(now):
            started.append(now)
        else:
            due = bucket.next_token_at(now)
            assert due > now  # a real time to sleep until: no polling
            now = due + rand.uniform(0, late)
    return started


def steady_rate(started: list[float], burst: int) -> float:
    return (len(started) - burst) / (started[-1] - started[burst - 1])


@pytest.mark.parametrize("late", [0.0, 0.005])
def test_the_steady_rate_is_within_one_percent_over_1000_messages_at_50_per_second(late):
    started = admit_all(TokenBucket(Rate.parse("50/s")), 1000, late=late)
    assert started[:50] == [0.0] * 50 and started[50] > 0  # the first second's burst: the capacity
    assert steady_rate(started, 50) == pytest.approx(50, rel=0.01)
    assert 1000 / started[-1] <= 50 * 1000 / 950  # never faster than the limit beyond that burst


def test_no_interval_holds_more_than_the_capacity_plus_the_rate_times_its_length():
    started = admit_all(TokenBucket(Rate.parse("50/s")), 400, late=0.003)
    for i in range(len(started)):
        for j in range(i, min(i + 120, len(started))):
            assert j - i + 1 <= 50 + 50 * (started[j] - started[i]) + 1e-6


def test_a_burst_is_bounded_by_the_capacity_even_after_a_long_idle_spell():
    bucket = TokenBucket(Rate.parse("50/s"))
    assert sum(bucket.take(0.0) for _ in range(80)) == 50
    assert sum(bucket.take(3600.0) for _ in range(80)) == 50
    slow = TokenBucket(Rate.parse("0.5/s"))
    assert slow.capacity == 1 and slow.take(0.0) and not slow.take(0.0) and slow.next_token_at(0.0) == pytest.approx(2.0)


def test_per_minute_and_per_hour_rates_are_smoothed_to_one_seconds_tokens():
    per_minute = TokenBucket(Rate.parse("600/m"))
    assert per_minute.capacity == 10
    started = admit_all(per_minute, 610)
    assert started[9] == 0.0 and started[10] > 0 and started[-1] == pytest.approx(60.0)
    per_hour = TokenBucket(Rate.parse("100/h"))
    assert per_hour.capacity == 1 and per_hour.take(5.0) and not per_hour.take(5.0)
    assert per_hour.next_token_at(5.0) == pytest.approx(41.0) and per_hour.next_token_at(20.0) == pytest.approx(41.0)
    assert not per_hour.take(40.9) and per_hour.take(41.0)


def test_next_token_at_is_now_when_a_token_is_there_and_never_moves_with_time_running_backwards():
    bucket = TokenBucket(Rate.parse("10/s"))
    assert bucket.next_token_at(1.0) == 1.0
    for _ in range(10):
        assert bucket.take(1.0)
    assert bucket.next_token_at(1.0) == pytest.approx(1.1)
    assert bucket.next_token_at(0.5) == pytest.approx(1.1) and not bucket.take(0.5)
    assert bucket.take(1.1)


# -- the table of tasks -----------------------------------------------------------------------------
def test_a_task_without_a_limit_never_waits():
    limits = RateLimits({"send": Rate.parse("1/s")})
    assert "send" in limits and "other" not in limits
    assert all(limits.allow("other", 0.0) for _ in range(100)) and limits.wait_until("other", 0.0) is None
    assert limits.allow("send", 0.0) and not limits.allow("send", 0.0) and limits.wait_until("send", 0.0) == pytest.approx(1.0)


def test_reconfiguring_keeps_a_bucket_whose_limit_is_unchanged_and_grants_no_burst_for_a_changed_one():
    limits = RateLimits({"send": Rate.parse("10/s"), "mail": Rate.parse("1/s"), "gone": Rate.parse("1/s")})
    for _ in range(10):
        assert limits.allow("send", 0.0)
    assert limits.allow("mail", 0.0)
    limits.configure({"send": Rate.parse("600/m"), "mail": Rate.parse("100/s"), "new": Rate.parse("5/s")})  # 600/m is 10/s
    assert not limits.allow("send", 0.0) and limits.wait_until("send", 0.0) == pytest.approx(0.1)  # the same bucket, still empty
    assert not limits.allow("mail", 0.0)  # a higher rate, but the tokens it had (none), not a fresh 100
    assert limits.allow("mail", 0.01)  # refilled at the new rate: 100/s
    assert "gone" not in limits and limits.allow("gone", 0.0)
    assert sum(limits.allow("new", 0.0) for _ in range(10)) == 5
    limits.configure({"send": Rate.parse("1/s")})
    assert limits.rate_of("send") == Rate.parse("1/s") and not limits.allow("send", 0.05)


def test_hosts_share_a_limit_evenly():
    limits = RateLimits({"send": Rate.parse("20/s")}, hosts=4)
    assert limits.rate_of("send") == Rate(5, 1) and sum(limits.allow("send", 0.0) for _ in range(20)) == 5
    limits.configure({"send": Rate.parse("20/s")}, hosts=2)
    assert limits.rate_of("send") == Rate(10, 1)
    with pytest.raises(ValueError, match="hosts"):
        limits.configure({}, hosts=0)


def test_the_config_overrides_what_the_task_declares():
    limits = limits_of({"send": 20.0, "mail": 100 / 3600, "free": None}, {"send": "5/s", "push": "1/m"})
    assert {task: str(rate) for task, rate in limits.items()} == {"send": "5/s", "mail": "100/h", "push": "1/m"}


# -- where limits are declared --------------------------------------------------------------------
def test_at_task_rate_limit_is_parsed_where_it_is_written(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", registry.Registry())
    registry.task("send", rate_limit="600/m")(lambda m: None)
    assert registry.REGISTRY.get("send").options.rate_limit == 10.0
    with pytest.raises(RegistryError, match=r"@task\('bad'\) at .*rate_limit '5/d' is not a rate"):
        registry.task("bad", rate_limit="5/d")(lambda m: None)
    with pytest.raises(RegistryError, match="more than 0"):
        registry.task("zero", rate_limit="0/s")(lambda m: None)


def test_the_fork_server_announces_a_rate_limit_and_the_supervisor_checks_it():
    packet = Ready(tasks=(("send", TaskOptions(rate_limit=20.0)),))
    assert decode_control(encode_control(packet)).tasks == packet.tasks
    for bad in (0, -1.0, float("inf"), 2e6, True, "20/s"):
        assert any("rate_limit" in p for p in TaskOptions(rate_limit=bad).problems()), bad  # type: ignore[arg-type]
    forged = encode_control(packet).replace(b'"rate_limit":20.0', b'"rate_limit":0')
    with pytest.raises(WorkerProtocolError, match="rate_limit"):
        decode_control(forged)


def test_tasks_rate_limits_in_the_config_are_checked_named_and_reloadable():
    settings = Settings(tasks={"rate_limits": {"send": "20/s"}})
    assert settings.tasks.rate_limits == {"send": "20/s"}
    with pytest.raises(ValueError, match=r"tasks.rate_limits[\s\S]*send: '5/d' is not a rate"):
        Settings(tasks={"rate_limits": {"send": "5/d"}})
    with pytest.raises(ConfigError, match="tasks.rate_limits: no task named 'sned'"):
        Settings(tasks={"rate_limits": {"sned": "1/s"}}).check_task_names({"send"})
    new, applied, refused = reload_plan(settings, Settings(tasks={"rate_limits": {"send": "5/s"}}, rate_limit={"hosts": 3}))
    assert applied == ["tasks.rate_limits", "rate_limit.hosts"] and refused == [] and new.tasks.rate_limits == {"send": "5/s"}
    _, applied, refused = reload_plan(
        settings, settings.model_copy(update={"rate_limit": Settings(rate_limit={"redis": "redis://127.0.0.1:6379/0"}).rate_limit})
    )
    assert applied == [] and refused == ["rate_limit.redis"]


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://redis.internal", "rediss://:pw@cache.example:6380/2", "unix:///run/redis/redis.sock"]
)
def test_a_redis_address_is_redis_rediss_or_unix(url):
    assert Settings(rate_limit={"redis": url}).rate_limit.redis == url


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://:6379/0", "redis://h:99999/0", "redis://h/x", "unix://run/r.sock"]
)
def test_anything_else_is_not_a_redis_address(url):
    with pytest.raises(ValueError, match="rate_limit.redis"):
        Settings(rate_limit={"redis": url})


def test_a_password_in_the_redis_address_is_never_shown():
    settings = Settings(rate_limit={"redis": "redis://user:hunter2@127.0.0.1:6379/0"})
    assert settings.masked()["rate_limit"]["redis"] == "redis://user:***@127.0.0.1:6379/0"
    with pytest.raises(ValueError) as err:
        Settings(rate_limit={"redis": "redis://:hunter2@h:99999/0"})
    assert "hunter2" not in str(err.value).split("[type=")[0]

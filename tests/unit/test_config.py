from pathlib import Path

import pydantic
import pytest

from consumerd.config import DEFAULT_CONFIG_PATH, config_path, load_settings
from consumerd.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("CONSUMERD_") or name in ("GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_contract(tmp_path):
    s = load_settings(write(tmp_path, '[pubsub]\nproject = "p"\nsubscription = "jobs"\n'))
    assert (s.workers.concurrency, s.workers.max_tasks_per_child, s.workers.task_timeout) == (8, 0, 600)
    assert (s.leases.ack_deadline, s.shutdown.drain_timeout) == (60, 60)
    assert (s.tasks.modules, s.tasks.route_attribute, s.tasks.default) == ([], "task", "")
    assert (s.logging.format, s.logging.level) == ("auto", "info")
    assert s.pubsub.subscription_path == "projects/p/subscriptions/jobs"


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("workers", "concurrency", "0", "greater than or equal to 1"),
        ("workers", "concurrency", '"many"', "valid integer"),
        ("workers", "max_tasks_per_child", "-1", "greater than or equal to 0"),
        ("workers", "task_timeout", "0", "greater than 0"),
        ("workers", "max_memory_per_child", '"512M"', "is not a size: use bytes (an integer) or a number and one of B, kB"),
        ("workers", "max_memory_per_child", '"lots"', "is not a size"),
        ("workers", "max_memory_per_child", "-1", "greater than or equal to 0"),
        ("workers", "max_memory_per_child", "1.5", "valid integer"),
        ("workers", "memory_limit", "true", "not true or false"),
        ("workers", "memory_limit", '"1MiB"', "at least 64 MiB"),
        ("leases", "ack_deadline", "5", "greater than or equal to 10"),
        ("leases", "ack_deadline", "601", "less than or equal to 600"),
        ("shutdown", "drain_timeout", "-1", "greater than or equal to 0"),
        ("tasks", "modules", '"myapp.tasks"', "valid list"),
        ("tasks", "modules", '["not a module"]', "not a Python module name"),
        ("tasks", "route_attribute", '""', "at least 1 character"),
        ("logging", "format", '"xml"', "'auto', 'json', 'console' or 'gcp'"),
        ("logging", "level", '"loud"', "'debug'"),
        ("pubsub", "subscription", '"a/b"', "subscription name"),
        ("pubsub", "emulator_host", '"localhost"', "HOST:PORT"),
    ],
)
def test_each_bad_value_is_one_line_naming_key_and_file(tmp_path, section, key, value, needle):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert "\n" not in text
    assert f"{section}.{key}" in text and str(path) in text and needle in text


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 2**20),
        ("200MB", 200 * 10**6),
        ("1GiB", 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("2gb", 2 * 10**9),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_memory_sizes_are_bytes_or_a_number_with_a_unit(tmp_path, text, size):
    value = f'"{text}"' if isinstance(text, str) else str(text)
    s = load_settings(write(tmp_path, f"[workers]\nmax_memory_per_child = {value}\n"))
    assert s.workers.max_memory_per_child == size


def test_a_memory_size_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUMERD_WORKERS__MEMORY_LIMIT", "1GiB")
    assert load_settings(write(tmp_path, "")).workers.memory_limit == 2**30


@pytest.mark.parametrize("text", ["[workers]\nconcurency = 2\n", "[worker]\nconcurrency = 2\n", "top = 1\n"])
def test_unknown_keys_and_sections_are_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(write(tmp_path, text))


def test_env_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUMERD_WORKERS__CONCURRENCY", "3")
    monkeypatch.setenv("CONSUMERD_TASKS__MODULES", '["a.b", "c"]')
    s = load_settings(write(tmp_path, "[workers]\nconcurrency = 9\nmax_tasks_per_child = 4\n"))
    assert s.workers.concurrency == 3 and s.workers.max_tasks_per_child == 4
    assert s.tasks.modules == ["a.b", "c"]


def test_env_value_that_does_not_parse_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUMERD_WORKERS__CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="environment CONSUMERD_WORKERS__CONCURRENCY: workers.concurrency"):
        load_settings(write(tmp_path, ""))


def test_env_list_that_is_not_json_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUMERD_TASKS__MODULES", "a.b,c")
    with pytest.raises(ConfigError, match="list values are JSON"):
        load_settings(write(tmp_path, ""))


@pytest.mark.parametrize("name", ["CONSUMERD_WORKER__CONCURRENCY", "CONSUMERD_CONCURRENCY", "CONSUMERD_WORKERS__CONCURENCY"])
def test_env_typos_are_errors(tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "2")
    with pytest.raises(ConfigError, match=name):
        load_settings(write(tmp_path, ""))


def test_google_variables_are_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-env")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
    s = load_settings(write(tmp_path, '[pubsub]\nsubscription = "jobs"\n'))
    assert s.pubsub.project == "from-env" and s.pubsub.emulator_host == "127.0.0.1:8085"
    explicit = load_settings(write(tmp_path, '[pubsub]\nproject = "mine"\nsubscription = "jobs"\n'))
    assert explicit.pubsub.project == "mine"


def test_full_subscription_path_supplies_the_project(tmp_path):
    s = load_settings(write(tmp_path, '[pubsub]\nsubscription = "projects/x/subscriptions/jobs"\n'))
    assert s.pubsub.project == "x" and s.pubsub.subscription_path == "projects/x/subscriptions/jobs"


def test_run_requires_subscription_and_project(tmp_path):
    with pytest.raises(ConfigError, match="pubsub.subscription: required"):
        load_settings(write(tmp_path, "")).require_subscription("f")
    with pytest.raises(ConfigError, match="pubsub.project: required"):
        load_settings(write(tmp_path, '[pubsub]\nsubscription = "jobs"\n')).require_subscription("f")


def test_toml_syntax_error_has_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"TOML syntax error: .*line 3, column"):
        load_settings(write(tmp_path, "[pubsub]\nproject = 'p'\nsubscription = = 1\n"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path)


def test_config_path_precedence(monkeypatch):
    assert config_path(None) == (DEFAULT_CONFIG_PATH, False)
    monkeypatch.setenv("CONSUMERD_CONFIG", "/srv/c.toml")
    assert config_path(None) == (Path("/srv/c.toml"), True)
    assert config_path("/x.toml") == (Path("/x.toml"), True)


def test_credentials_resolve_against_systemd_credentials_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/consumerd.service")
    s = load_settings(write(tmp_path, '[pubsub]\ncredentials_file = "gcp-key.json"\n'))
    assert str(s.pubsub.credentials_path()) == "/run/credentials/consumerd.service/gcp-key.json"
    assert "contents not shown" in s.masked()["pubsub"]["credentials_file"]


def test_the_endpoint_is_host_and_port_and_reaches_the_channel(tmp_path, monkeypatch):
    from consumerd.adapters.pubsub.client import PubSub, SubscriberGrpcTransport
    from consumerd.config import PubSubSettings

    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    for bad in ("pubsub.googleapis.com", "https://pubsub.googleapis.com:443", "host:0", "a b:443"):
        with pytest.raises(pydantic.ValidationError, match="HOST:PORT"):
            PubSubSettings(endpoint=bad)
    settings = PubSubSettings(project="p", endpoint="europe-west1-pubsub.googleapis.com:443")
    seen = {}
    monkeypatch.setattr("consumerd.adapters.pubsub.credentials.load", lambda path, scopes: "creds")
    monkeypatch.setattr("consumerd.adapters.pubsub.credentials.channel_credentials", lambda creds, scopes, host: (f"tls+{creds}", None))
    monkeypatch.setattr("grpc.secure_channel", lambda target, tls, options: seen.update(target=target, tls=tls) or "channel")
    assert PubSub(settings)._channel(SubscriberGrpcTransport) == "channel"
    assert seen == {"target": "europe-west1-pubsub.googleapis.com:443", "tls": "tls+creds"}


def test_a_reload_refuses_what_was_built_at_start_and_applies_the_rest():
    from consumerd.config import Settings, reload_plan

    old = Settings.model_validate({"pubsub": {"project": "proj", "subscription": "jobs"}})
    new = Settings.model_validate(
        {
            "pubsub": {"project": "proj", "subscription": "jobs"},
            "dead_letter": {"topic": "dlq"},
            "workers": {"hide_credentials": False, "concurrency": 3},
        }
    )
    merged, applied, refused = reload_plan(old, new)
    assert sorted(refused) == ["dead_letter.topic", "workers.hide_credentials"]
    assert applied == ["workers.concurrency"]
    assert (merged.dead_letter.topic, merged.workers.hide_credentials, merged.workers.concurrency) == ("", True, 3)


def test_a_reload_whose_applied_keys_need_a_refused_one_is_one_config_error():
    import pytest

    from consumerd.config import Settings, reload_plan
    from consumerd.errors import ConfigError

    old = Settings.model_validate({"pubsub": {"project": "proj", "subscription": "jobs"}})
    new = Settings.model_validate(
        {"pubsub": {"project": "proj", "subscription": "jobs"}, "dead_letter": {"topic": "dlq", "max_attempts": 7}}
    )
    with pytest.raises(ConfigError, match=r"dead_letter.max_attempts.*dead_letter.topic.*needs a topic"):
        reload_plan(old, new)


# -- [[subscriptions]] ------------------------------------------------------------------------------
SEVERAL = """[pubsub]
project = "p"
[retry]
min_backoff = 2
[dead_letter]
topic = "dead"
[[subscriptions]]
name = "orders"
weight = 3
max_concurrency = 6
[subscriptions.dead_letter]
topic = "orders-dead"
max_attempts = 5
[subscriptions.leases]
ack_deadline = 120
[[subscriptions]]
name = "projects/q/subscriptions/emails"
"""


def test_several_subscriptions_each_get_the_global_settings_with_their_own_overrides(tmp_path):
    streams = load_settings(write(tmp_path, SEVERAL)).streams()
    orders, emails = streams
    assert (orders.path, orders.weight, orders.max_concurrency) == ("projects/p/subscriptions/orders", 3, 6)
    assert (orders.settings.dead_letter.topic, orders.settings.dead_letter.max_attempts) == ("orders-dead", 5)
    assert orders.settings.leases.ack_deadline == 120 and orders.settings.retry.min_backoff == 2  # the rest is global
    assert (emails.path, emails.weight, emails.max_concurrency, emails.name) == ("projects/q/subscriptions/emails", 1, 0, "emails")
    assert emails.settings.dead_letter.topic == "dead" and emails.settings.leases.ack_deadline == 60
    assert orders.settings.subscriptions == [] and orders.settings.pubsub.subscription == "orders"


def test_one_subscription_is_one_stream_of_weight_one(tmp_path):
    [only] = load_settings(write(tmp_path, '[pubsub]\nproject = "p"\nsubscription = "jobs"\n')).streams()
    assert (only.path, only.weight, only.max_concurrency) == ("projects/p/subscriptions/jobs", 1, 0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[pubsub]\nproject = "p"\nsubscription = "jobs"\n[[subscriptions]]\nname = "orders"\n', "not both"),
        (
            '[pubsub]\nproject = "p"\n[[subscriptions]]\nname = "orders"\n[[subscriptions]]\nname = "projects/p/subscriptions/orders"\n',
            "listed twice",
        ),
        ('[pubsub]\nproject = "p"\n[[subscriptions]]\nname = "orders"\nweight = 0\n', "subscriptions.0.weight"),
        ('[pubsub]\nproject = "p"\n[[subscriptions]]\nname = "o"\n', "subscriptions.0.name: Value error, must be a subscription name"),
        ('[pubsub]\nproject = "p"\n[[subscriptions]]\nweight = 2\n', "subscriptions.0.name"),
        ('[pubsub]\nproject = "p"\n[[subscriptions]]\nname = "orders"\n[subscriptions.flow]\nmax_message_bytes = 5\n', "unknown key"),
        (
            '[pubsub]\nproject = "p"\n[retry]\nmax_backoff = 10\n[[subscriptions]]\nname = "orders"\n[subscriptions.retry]\nmin_backoff = 20\n',
            "subscription 'orders': its [retry] overrides: min_backoff must not exceed max_backoff",
        ),
    ],
)
def test_a_bad_subscriptions_table_is_a_config_error_naming_it(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as caught:
        load_settings(write(tmp_path, text))
    assert needle in str(caught.value), str(caught.value)


def test_run_needs_a_subscription_in_one_form_or_the_other(tmp_path):
    with pytest.raises(ConfigError, match="or \\[\\[subscriptions\\]\\]"):
        load_settings(write(tmp_path, '[pubsub]\nproject = "p"\n')).require_subscription("c.toml")
    load_settings(write(tmp_path, SEVERAL)).require_subscription("c.toml")

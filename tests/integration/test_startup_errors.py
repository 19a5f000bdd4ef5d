"""Start-up failures: a clear one-line error and the right exit code, nothing pulled."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.daemon import REPO, daemon_env
from tests.support.pubsub import toml

pytestmark = pytest.mark.integration


def run_consumerd(tmp_path, emulator_host, settings, *args):
    config = tmp_path / "bad.toml"
    config.write_text(settings if isinstance(settings, str) else toml(settings))
    return subprocess.run(
        [sys.executable, "-m", "consumerd", *(args or ("run",)), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(emulator_host, tmp_path),
        cwd=REPO,
    )


def assert_config_error(result, *needles):
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr}"
    assert lines[0].startswith("consumerd: config error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0]


def test_unknown_key_exits_78(tmp_path, emulator):
    result = run_consumerd(tmp_path, emulator.host, {"pubsub": {"subscription": "jobs"}, "workers": {"concurency": 2}})
    assert_config_error(result, "workers.concurency", "unknown key", str(tmp_path / "bad.toml"))


def test_toml_syntax_error_names_line_and_column(tmp_path, emulator):
    result = run_consumerd(tmp_path, emulator.host, "[pubsub]\nsubscription = = 'x'\n")
    assert_config_error(result, "line 2", "column")


def test_missing_subscription_exits_78_without_pulling(tmp_path, emulator):
    result = run_consumerd(
        tmp_path,
        emulator.host,
        {"pubsub": {"subscription": "does-not-exist"}, "tasks": {"modules": ["consumerd.demo"]}, "logging": {"format": "json"}},
    )
    assert_config_error(result, "does-not-exist", "does not exist")
    assert '"daemon.ready"' not in result.stdout


def test_task_module_that_fails_to_import_exits_78(tmp_path, emulator):
    result = run_consumerd(tmp_path, emulator.host, {"pubsub": {"subscription": "jobs"}, "tasks": {"modules": ["no_such_module_xyz"]}})
    assert_config_error(result, "tasks.modules", "no_such_module_xyz")


def test_default_task_must_exist(tmp_path, emulator):
    result = run_consumerd(
        tmp_path, emulator.host, {"pubsub": {"subscription": "jobs"}, "tasks": {"modules": ["consumerd.demo"], "default": "nope"}}
    )
    assert_config_error(result, "tasks.default", "nope")


def test_missing_config_file_exits_78(tmp_path, emulator):
    result = subprocess.run(
        [sys.executable, "-m", "consumerd", "run", "--config", str(tmp_path / "absent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(emulator.host, tmp_path),
        cwd=REPO,
    )
    assert_config_error(result, "absent.toml", "not found")


def test_check_config_prints_effective_settings(tmp_path, emulator):
    settings = {"pubsub": {"subscription": "jobs"}, "workers": {"concurrency": 3}, "tasks": {"modules": ["consumerd.demo"]}}
    result = run_consumerd(tmp_path, emulator.host, settings, "check-config")
    assert result.returncode == 0, result.stderr
    assert '"concurrency": 3' in result.stdout and '"project": "test-project"' in result.stdout


def test_tasks_lists_names_and_origins(tmp_path, emulator):
    result = run_consumerd(tmp_path, emulator.host, {"pubsub": {"subscription": "jobs"}, "tasks": {"modules": ["consumerd.demo"]}}, "tasks")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["echo", "fail", "fetch", "hash", "noop", "resize", "rows", "sleep"]
    assert "consumerd.demo.echo" in result.stdout


def _fake_key(path, secret):
    import json

    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key_id": "k1",
                "private_key": f"-----BEGIN PRIVATE KEY-----\\n{secret}\\n-----END PRIVATE KEY-----\\n",
                "client_email": "x@p.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )


def test_credentials_are_never_printed_and_loose_permissions_are_warned(tmp_path, emulator):
    secret = "TOP-SECRET-KEY-MATERIAL-91c2"
    key = tmp_path / "key.json"
    _fake_key(key, secret)
    key.chmod(0o644)
    settings = {
        "pubsub": {"subscription": "does-not-exist", "credentials_file": str(key)},
        "tasks": {"modules": ["consumerd.demo"]},
        "logging": {"format": "json"},
    }
    checked = run_consumerd(tmp_path, emulator.host, settings, "check-config")
    assert checked.returncode == 0 and "contents not shown" in checked.stdout
    ran = run_consumerd(tmp_path, emulator.host, settings)
    assert ran.returncode == 78  # the subscription does not exist (after the permission check)
    assert '"security.permissions"' in ran.stdout and "chmod 600" in ran.stdout
    for output in (checked.stdout, checked.stderr, ran.stdout, ran.stderr):
        assert secret not in output


def test_unreadable_or_missing_credentials_exit_78(tmp_path, emulator):
    settings = {
        "pubsub": {"subscription": "jobs", "credentials_file": str(tmp_path / "absent.json"), "emulator_host": ""},
        "tasks": {"modules": ["consumerd.demo"]},
    }
    config = tmp_path / "bad.toml"
    config.write_text(toml(settings))
    env = daemon_env(emulator.host, tmp_path)
    env.pop("PUBSUB_EMULATOR_HOST")  # a real-service configuration: the key must be loaded
    result = subprocess.run(
        [sys.executable, "-m", "consumerd", "run", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert_config_error(result, "pubsub.credentials_file", "absent.json", "not found")

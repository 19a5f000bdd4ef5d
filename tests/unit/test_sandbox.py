"""What task code can see of the daemon: the fork server's environment, the supervisor's dumpability."""

from __future__ import annotations

import subprocess
import sys

import pytest

from consumerd.config import load_settings
from consumerd.errors import ConfigError
from consumerd.sandbox import task_environment


def test_the_task_environment_has_no_secrets_and_no_daemon_channels():
    daemon = {
        "PATH": "/usr/bin",
        "CREDENTIALS_DIRECTORY": "/run/credentials/consumerd.service",
        "GOOGLE_APPLICATION_CREDENTIALS": "/etc/key.json",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "CONSUMERD_CONTROL__SOCKET": "/run/consumerd/control.sock",
        "CONSUMERD_METRICS__LISTEN": "127.0.0.1:9464",
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085",
    }
    env = task_environment(daemon, {"GOOGLE_APPLICATION_CREDENTIALS": "/etc/tasks-key.json", "DB_URL": "postgres://db"})
    assert env == {
        "PATH": "/usr/bin",
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085",
        "GOOGLE_APPLICATION_CREDENTIALS": "/etc/tasks-key.json",  # the tasks' own, from [workers] environment
        "DB_URL": "postgres://db",
    }


def test_the_supervisor_process_becomes_undumpable():
    code = "import ctypes; from consumerd.sandbox import make_undumpable; assert make_undumpable(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"  # PR_GET_DUMPABLE


def test_workers_environment_names_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pubsub]\nsubscription = "jobs"\n[workers]\nenvironment = { "BAD NAME" = "x" }\n')
    with pytest.raises(ConfigError, match="not a valid variable name"):
        load_settings(path)
    path.write_text('[pubsub]\nsubscription = "jobs"\n[workers]\nenvironment = { DB_URL = "postgres://db" }\n')
    assert load_settings(path).workers.environment == {"DB_URL": "postgres://db"}

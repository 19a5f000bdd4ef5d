"""What task code can see of the daemon: the fork server's environment, the supervisor's dumpability."""

from __future__ import annotations

import subprocess
import sys

import pytest

from consumerd.config import load_settings
from consumerd.errors import ConfigError
from consumerd.pool.sandbox import task_environment


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
    code = "import ctypes; from consumerd.pool.sandbox import make_undumpable; assert make_undumpable(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"  # PR_GET_DUMPABLE


def test_workers_environment_names_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pubsub]\nsubscription = "jobs"\n[workers]\nenvironment = { "BAD NAME" = "x" }\n')
    with pytest.raises(ConfigError, match="not a valid variable name"):
        load_settings(path)
    path.write_text('[pubsub]\nsubscription = "jobs"\n[workers]\nenvironment = { DB_URL = "postgres://db" }\n')
    assert load_settings(path).workers.environment == {"DB_URL": "postgres://db"}


def test_only_the_load_credential_directory_is_hidden_and_other_keys_are_reported():
    from consumerd.pool.sandbox import credentials_exposure, hidden_from_tasks

    creds = "/run/credentials/consumerd.service"
    assert hidden_from_tasks({"CREDENTIALS_DIRECTORY": creds}) == (creds,)
    assert hidden_from_tasks({}) == ()
    assert credentials_exposure(f"{creds}/key.json", {"CREDENTIALS_DIRECTORY": creds}, hide=True) == ""
    assert credentials_exposure("", {}, hide=True) == ""  # ADC from the metadata server: no file
    assert "not under $CREDENTIALS_DIRECTORY" in credentials_exposure(
        "/etc/consumerd/key.json", {"CREDENTIALS_DIRECTORY": creds}, hide=True
    )
    assert "GOOGLE_APPLICATION_CREDENTIALS" in credentials_exposure("", {"GOOGLE_APPLICATION_CREDENTIALS": "/etc/key.json"}, hide=True)
    # A sibling whose name starts like the directory is not inside it.
    assert credentials_exposure(f"{creds}-other/key.json", {"CREDENTIALS_DIRECTORY": creds}, hide=True)
    assert credentials_exposure(f"{creds}/key.json", {"CREDENTIALS_DIRECTORY": creds}, hide=False) == "workers.hide_credentials is false"


def test_landlock_grants_every_sibling_on_the_way_and_nothing_on_it(tmp_path):
    from consumerd.adapters.landlock import grants

    (tmp_path / "run" / "credentials" / "consumerd.service").mkdir(parents=True)
    (tmp_path / "run" / "credentials" / "other.service").mkdir()
    (tmp_path / "run" / "consumerd").mkdir()
    (tmp_path / "run" / "pid").write_text("1")
    (tmp_path / "run" / "sneaky").symlink_to(tmp_path / "run" / "credentials" / "consumerd.service")
    (tmp_path / "etc").mkdir()
    granted = set(grants([str(tmp_path / "run" / "credentials" / "consumerd.service")]))
    assert {
        tmp_path / "etc",
        tmp_path / "run" / "consumerd",
        tmp_path / "run" / "pid",
        tmp_path / "run" / "credentials" / "other.service",
    } <= granted
    on_the_way = {tmp_path / "run", tmp_path / "run" / "credentials", *(tmp_path / "run").parents}
    assert not granted & on_the_way
    assert tmp_path / "run" / "credentials" / "consumerd.service" not in granted
    assert tmp_path / "run" / "sneaky" not in granted  # a symlink into the hidden directory
    assert grants([str(tmp_path / "missing")]) == []


def test_landlock_hides_a_directory_from_the_process_and_its_children_for_good(tmp_path):
    """On the real kernel: in a child process, so that the test process keeps its rights."""
    secret = tmp_path / "credentials" / "consumerd.service"
    secret.mkdir(parents=True)
    (secret / "key.json").write_text("{}")
    (tmp_path / "data.txt").write_text("fine")
    (tmp_path / "granted").mkdir()
    (tmp_path / "granted" / "link").symlink_to(secret / "key.json")  # Landlock checks where a path leads
    probe = f"""
import os, sys
from consumerd.adapters import landlock
result = landlock.hide([{str(secret)!r}])
if isinstance(result, landlock.NotHidden):
    print("unsupported", result.reason); sys.exit(0)
def can(path):
    try:
        open(path).read(); return "read"
    except PermissionError:
        return "denied"
print(can({str(secret / "key.json")!r}), can({str(tmp_path / "data.txt")!r}), can("/proc/self/root" + {str(secret / "key.json")!r}), can({str(tmp_path / "granted" / "link")!r}))
if os.fork() == 0:
    print("child", can({str(secret / "key.json")!r})); sys.stdout.flush(); os._exit(0)
os.wait()
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "unsupported":
        pytest.skip(" ".join(out))
    assert out == ["denied", "read", "denied", "denied", "child", "denied"]


def test_landlock_hides_nothing_when_the_path_is_missing_and_refuses_to_hide_the_root(tmp_path):
    """A ruleset without rules would make every file unreadable: the fork server could not even import."""
    probe = f"""
from consumerd.adapters import landlock
print(landlock.hide([{str(tmp_path / "absent")!r}]))
print(landlock.hide(["/"]))
print(open({str(__file__)!r}).read(10) != "")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["Hidden(paths=(), granted=0)", "NotHidden(reason='refusing to hide /: nothing else would stay readable')", "True"]

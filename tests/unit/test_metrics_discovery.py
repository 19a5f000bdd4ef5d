"""Instances that coexist: only the built-in metrics address falls back to a free port, and the
file_sd target file that tells Prometheus where each instance is."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from consumerd.adapters.discovery import TargetFile, scrape_address, target_groups
from consumerd.adapters.prometheus import Metrics, MetricsServer
from consumerd.config import MetricsSettings, load_settings
from consumerd.config.operations import DEFAULT_LISTEN, FALLBACK_LISTEN
from consumerd.errors import ConfigError
from consumerd.supervisor.reporter import Reporter


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CONSUMERD_") or name == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(name)


@pytest.fixture
def taken():
    """A loopback port another process holds (listening, as a second daemon would find it)."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield f"127.0.0.1:{holder.getsockname()[1]}"


def settings_from(tmp_path: Path, metrics: str = "") -> MetricsSettings:
    path = tmp_path / "c.toml"
    path.write_text(f'[pubsub]\nproject = "p"\nsubscription = "jobs"\n{metrics}')
    return load_settings(path).metrics


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.records.append((level, event, fields))


# == which address may fall back ===================================================================
def test_only_the_built_in_default_may_fall_back(tmp_path, monkeypatch):
    assert settings_from(tmp_path).fallback() == FALLBACK_LISTEN == "127.0.0.1:0"
    assert settings_from(tmp_path, '[metrics]\nfile_sd = "/x.json"\n').fallback() == FALLBACK_LISTEN  # the section, not the key
    # The default's own value, written out, is an operator's choice: strict.
    assert settings_from(tmp_path, f'[metrics]\nlisten = "{DEFAULT_LISTEN}"\n').fallback() is None
    assert settings_from(tmp_path, '[metrics]\nlisten = "127.0.0.1:9500"\n').fallback() is None
    monkeypatch.setenv("CONSUMERD_METRICS__LISTEN", DEFAULT_LISTEN)
    assert settings_from(tmp_path).fallback() is None


def test_the_target_file_defaults_to_the_runtime_directory_under_systemd(tmp_path, monkeypatch):
    assert settings_from(tmp_path).file_sd_path() is None  # not under systemd, not set: none
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/consumerd/thumbnails:/run/other")
    assert settings_from(tmp_path).file_sd_path() == Path("/run/consumerd/thumbnails/prometheus.json")
    assert settings_from(tmp_path, '[metrics]\nfile_sd = "/srv/sd/a.json"\n').file_sd_path() == Path("/srv/sd/a.json")
    assert settings_from(tmp_path, '[metrics]\nlisten = ""\nfile_sd = "/srv/sd/a.json"\n').file_sd_path() is None  # nothing to point at


# == binding ========================================================================================
def test_a_taken_address_with_a_fallback_listens_on_a_free_port(taken):
    server = MetricsServer(Metrics("1.0", lambda: ({}, {}), ()), taken, fallback=FALLBACK_LISTEN)
    try:
        host, _, port = server.address.rpartition(":")
        assert host == "127.0.0.1" and port != "0" and server.address != taken
        assert server.server.sock.getsockname()[1] == int(port)  # the address logged is the one bound
    finally:
        server.stop()


def test_a_taken_address_without_a_fallback_is_a_one_line_config_error(taken):
    with pytest.raises(ConfigError) as err:
        MetricsServer(Metrics("1.0", lambda: ({}, {}), ()), taken)
    assert str(err.value) == f'metrics.listen: cannot listen on {taken}: Address already in use (choose another port, or "" to turn it off)'


def test_only_a_taken_port_falls_back_not_an_address_this_host_does_not_have():
    with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1:9464: Cannot assign requested address"):
        MetricsServer(Metrics("1.0", lambda: ({}, {}), ()), "192.0.2.1:9464", fallback=FALLBACK_LISTEN)


# == the target file ================================================================================
def test_the_target_group_is_what_file_sd_reads():
    assert json.loads(target_groups("127.0.0.1:41234", {"subscription": "thumbnails"})) == [
        {"targets": ["127.0.0.1:41234"], "labels": {"subscription": "thumbnails"}}
    ]


@pytest.mark.parametrize(
    ("bound", "scraped"),
    [("127.0.0.1:9464", "127.0.0.1:9464"), ("0.0.0.0:9464", "127.0.0.1:9464"), ("[::]:9464", "[::1]:9464"), ("host-a:9464", "host-a:9464")],
)
def test_a_wildcard_address_is_scraped_on_loopback(bound, scraped):
    assert scrape_address(bound) == scraped


def test_the_file_is_readable_by_prometheus_whatever_the_umask_and_replaced_whole(tmp_path):
    path = tmp_path / "prometheus.json"
    path.write_text("old")
    old_umask = os.umask(0o077)  # the units' UMask=
    try:
        TargetFile(path).write("127.0.0.1:9464", {"subscription": "a"})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:9464"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prometheus.json"]  # no temporary file left


def test_a_file_that_cannot_be_written_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        TargetFile(tmp_path / "absent" / "prometheus.json").write("127.0.0.1:9464", {})
    directory = tmp_path / "read-only"
    directory.mkdir()
    (directory / "prometheus.json").mkdir()  # the rename cannot replace a directory
    with pytest.raises(OSError):
        TargetFile(directory / "prometheus.json").write("127.0.0.1:9464", {})
    assert sorted(p.name for p in directory.iterdir()) == ["prometheus.json"]


def test_remove_takes_away_only_this_daemons_entry(tmp_path):
    path = tmp_path / "a.json"
    mine = TargetFile(path)
    mine.remove()  # never written: nothing to do
    mine.write("127.0.0.1:1", {})
    TargetFile(path).write("127.0.0.1:2", {})  # a second daemon given the same path
    mine.remove()
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:2"]
    other = TargetFile(tmp_path / "b.json")
    other.write("127.0.0.1:3", {})
    other.remove()
    other.remove()
    assert not (tmp_path / "b.json").exists()


# == the reporter: listen, register, log ============================================================
def _serve(settings: MetricsSettings, log: Log, resources: contextlib.ExitStack) -> None:
    reporter = Reporter(None, Metrics("1.0", lambda: ({}, {}), ()), None, None)  # type: ignore[arg-type]
    reporter.serve(settings, ["projects/p/subscriptions/thumbnails"], resources, log)  # type: ignore[arg-type]


def test_the_reporter_registers_the_bound_address_and_removes_it_at_shutdown(tmp_path, monkeypatch, taken):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    # The default's fallback path, on a port that is taken: no need to hold 9464 itself.
    settings = MetricsSettings.model_construct(listen=taken, file_sd="", _fields_set=set())
    log = Log()
    with contextlib.ExitStack() as resources:
        _serve(settings, log, resources)
        [(level, event, fields)] = log.records
        assert (level, event) == ("info", "metrics.listening")
        assert fields["requested"] == taken and fields["address"] != taken and fields["file_sd"] == str(tmp_path / "prometheus.json")
        [group] = json.loads((tmp_path / "prometheus.json").read_text())
        assert group == {"targets": [fields["address"]], "labels": {"subscriptions": "thumbnails"}}
    assert not (tmp_path / "prometheus.json").exists()


def test_a_target_file_that_cannot_be_written_is_a_warning_and_the_server_still_runs(tmp_path):
    settings = MetricsSettings(listen="127.0.0.1:0", file_sd=str(tmp_path / "absent" / "a.json"))
    log = Log()
    with contextlib.ExitStack() as resources:
        _serve(settings, log, resources)
        [(level, event, fields), listening] = log.records
        assert (level, event, fields["path"]) == ("warning", "metrics.file_sd_failed", str(tmp_path / "absent" / "a.json"))
        assert "No such file or directory" in fields["error"]
        assert listening[1] == "metrics.listening" and listening[2]["file_sd"] == ""
        with socket.create_connection(tuple(listening[2]["address"].rsplit(":", 1)), timeout=5) as probe:  # type: ignore[arg-type]
            probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.0 200")

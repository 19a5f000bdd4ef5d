"""consumerd under a real systemd (PID 1 of a container), installed by deploy/install.sh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import consumerd
from harness.daemon import REPO

pytestmark = pytest.mark.system
UNITS = ("consumerd.service", "consumerd@.service")


def _wait_count(guest, event, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(guest.ledger_ids(event)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {event}: {guest.ledger()}"
        time.sleep(0.1)


def _wait_ids(guest, ids, event="done", timeout=60):
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(guest.ledger_ids(event)):
        assert time.monotonic() < deadline, f"not all {event}: {guest.ledger()}\n{guest.journal_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_files_verify_and_score_ok_offline(unit, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not found")
    # verify needs ExecStart's binary to exist: point the copy at this checkout's venv.
    text = (REPO / "systemd" / unit).read_text().replace("/opt/consumerd", sys.prefix)
    copy = tmp_path / unit
    copy.write_text(text)
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=15", str(copy)], capture_output=True, text=True
    )
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert security.returncode == 0 and score <= 1.5, security.stdout[-2000:]


def test_start_returns_after_ready_with_live_counters(guest, service, broker):
    topic, _ = service()
    guest.sh("systemctl start consumerd")  # Type=notify: returns once READY=1 arrived
    state = guest.show()
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["StatusText"].startswith("running:") and "0 succeeded" in state["StatusText"]
    ids = broker.publish(topic, 3, task="ok")
    _wait_ids(guest, ids)
    guest.wait_until(lambda s: "3 succeeded" in s["StatusText"], timeout=10, what="live counters in STATUS")
    assert guest.sh("systemd-analyze verify /etc/systemd/system/consumerd.service /etc/systemd/system/consumerd@.service").returncode == 0


def test_journal_holds_native_fields(guest, service, broker):
    topic, _ = service()
    guest.sh("systemctl start consumerd")
    ids = broker.publish(topic, 2, task="ok")
    [bad] = broker.publish(topic, task="no_such_task")
    _wait_ids(guest, ids)
    deadline = time.monotonic() + 20
    while (
        len(
            entries := [
                e for e in guest.journal("CONSUMERD_TASK=ok", "CONSUMERD_EVENT=message.done") if e.get("CONSUMERD_MESSAGE_ID") in ids
            ]
        )
        < 2
    ):
        assert time.monotonic() < deadline, guest.journal_text()[-2000:]
        time.sleep(0.2)
    entry = entries[0]
    assert entry["SYSLOG_IDENTIFIER"] == "consumerd" and entry["PRIORITY"] == "6"
    assert entry["CONSUMERD_OUTCOME"] == "success" and entry["CONSUMERD_MESSAGE_ID"] in ids
    assert entry["_TRANSPORT"] == "journal" and re.fullmatch(r"[0-9a-f]{32}", entry["MESSAGE_ID"])
    assert {e["MESSAGE_ID"] for e in entries} == {entry["MESSAGE_ID"]}, "one MESSAGE_ID per event type"
    # The bad message may come in a later pull than the good ones: wait for its entry too.
    while not any(
        e.get("CONSUMERD_MESSAGE_ID") == bad and e.get("CONSUMERD_OUTCOME") == "unknown_task" for e in guest.journal("-p", "err")
    ):
        assert time.monotonic() < deadline, guest.journal_text()[-2000:]
        time.sleep(0.2)


def test_journald_takes_an_entry_larger_than_a_datagram_through_a_memfd(guest):
    fields = "{'MESSAGE': 'memfd probe', 'SYSLOG_IDENTIFIER': 'consumerd-probe', **{f'PROBE_F{i}': str(i) * 60000 for i in range(6)}}"
    code = f"from consumerd.adapters.journal import JournalSender; s = JournalSender(); assert s.send({fields}) and not s.dropped"
    guest.sh(f'/opt/consumerd/bin/python -c "{code}"')
    deadline = time.monotonic() + 20
    while not (out := guest.sh("journalctl -t consumerd-probe -o json --all --no-pager", check=False).stdout.strip()):
        assert time.monotonic() < deadline, "the 360 KB entry never reached the journal"
        time.sleep(0.2)
    entry = json.loads(out.splitlines()[-1])
    assert entry["MESSAGE"] == "memfd probe" and entry["PROBE_F5"] == "5" * 60000 and entry["_TRANSPORT"] == "journal"


def test_frozen_loop_is_killed_by_the_watchdog_and_nothing_is_lost(guest, service, broker):
    topic, _ = service()
    guest.sh(
        "mkdir -p /etc/systemd/system/consumerd.service.d && printf '[Service]\\nWatchdogSec=3\\n' "
        "> /etc/systemd/system/consumerd.service.d/watchdog.conf && systemctl daemon-reload"
    )
    guest.sh("systemctl start consumerd")
    ids = broker.publish(topic, 4, data={"seconds": 1}, task="sleep")
    _wait_count(guest, "start", 1)
    main_pid = guest.show()["MainPID"]
    guest.sh(f"kill -STOP {main_pid}")
    guest.wait_until(lambda s: int(s["NRestarts"]) >= 1, timeout=30, what="a watchdog restart")
    assert "watchdog" in guest.journal_text().lower()
    _wait_ids(guest, ids, timeout=90)  # leases of the killed daemon end; the new one runs them


def test_stop_drains_running_tasks(guest, service, broker):
    topic, sub = service()
    guest.sh("systemctl start consumerd")
    ids = broker.publish(topic, 2, data={"seconds": 4}, task="sleep")
    _wait_count(guest, "start", 2)
    stopper = threading.Thread(target=guest.sh, args=("systemctl stop consumerd",))
    stopper.start()
    guest.wait_until(lambda s: s["ActiveState"] == "deactivating", timeout=10, what="deactivating")
    stopper.join(60)
    state = guest.show()
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success")
    assert sorted(guest.ledger_ids("done")) == sorted(ids)
    assert broker.pull_ids(sub, timeout=12) == []


def test_broken_config_fails_fast_without_a_restart_loop(guest, service):
    service(workers={"concurrency": 0})
    result = guest.sh("systemctl start consumerd", check=False)
    assert result.returncode != 0
    state = guest.wait_until(lambda s: s["ActiveState"] == "failed", timeout=20, what="failed")
    time.sleep(3)  # longer than RestartSec: a restart would have happened by now
    assert guest.show()["NRestarts"] == "0" and state["ExecMainStatus"] == "78"
    text = guest.journal_text()
    assert "workers.concurrency: Input should be greater than or equal to 1" in text


def test_under_the_units_sandbox_workers_outrank_the_supervisor_for_the_oom_killer_and_run_capped(guest, service, broker):
    memory = {"memory_limit": "500MiB", "max_memory_per_child": "200MiB"}
    topic, _ = service(workers=memory, tasks={"modules": ["tests.support.tasks", "tests.support.memory_tasks"]})
    guest.sh("systemctl start consumerd")
    assert guest.sh("systemctl show -p OOMPolicy --value consumerd").stdout.strip() == "continue"
    [big] = broker.publish(topic, data={"gb": 2}, task="allocate_once")
    ids = broker.publish(topic, 10, data={"mb": 50}, task="leak")
    _wait_ids(guest, [big, *ids])
    assert [p[0] for p in guest.ledger() if p[1] == big] == ["start", "start", f"allocated={10 * 2**20}", "done"]  # MemoryError, retried
    main_pid = guest.show()["MainPID"]
    [fork_server] = guest.sh(f"pgrep -P {main_pid}").stdout.split()
    workers = guest.sh(f"pgrep -P {fork_server}").stdout.split()
    supervisor = int(guest.sh(f"cat /proc/{main_pid}/oom_score_adj").stdout)
    assert [int(guest.sh(f"cat /proc/{pid}/oom_score_adj").stdout) for pid in workers] == [min(1000, supervisor + 500)] * len(workers)
    assert "524288000" in guest.sh(f"grep 'Max data size' /proc/{workers[0]}/limits").stdout
    assert "worker.memory_retired" in guest.journal_text()  # 10 x 50 MiB over 2 workers: one passed 200 MiB


def test_reload_applies_a_new_concurrency_without_losing_a_task(guest, service, broker):
    topic, _ = service()
    guest.sh("systemctl start consumerd")
    running = broker.publish(topic, 2, data={"seconds": 3}, task="sleep")
    _wait_count(guest, "start", 2)
    config = guest.sh("cat /etc/consumerd.toml").stdout.replace("concurrency = 2", "concurrency = 4")
    guest.write("/etc/consumerd.toml", config)
    guest.sh("systemctl reload consumerd")
    deadline = time.monotonic() + 20
    while not [e for e in guest.journal("CONSUMERD_EVENT=reload.done") if e.get("CONSUMERD_CONCURRENCY") == "4"]:
        assert time.monotonic() < deadline, guest.journal_text()[-2000:]
        time.sleep(0.2)
    more = broker.publish(topic, 4, data={"seconds": 1}, task="sleep")
    _wait_ids(guest, running + more)
    guest.wait_until(lambda s: "4 workers" in s["StatusText"], timeout=10, what="4 workers")
    assert guest.show()["ActiveState"] == "active"


def test_hardened_unit_runs_unprivileged_and_writes_only_its_state(guest, service, broker):
    topic, _ = service()
    guest.sh("systemctl start consumerd")
    [mid] = broker.publish(topic, task="write_probe")
    _wait_ids(guest, [mid])
    events = [parts[0] for parts in guest.ledger()]
    uid = next(e.split(":")[1] for e in events if e.startswith("uid:"))
    assert uid != "0"
    assert "writable:/var/lib/consumerd/probe" in events
    for path in ("/etc/consumerd-probe", "/opt/src/probe", "/usr/local/probe"):
        assert f"denied:{path}" in events
    main_uid = guest.sh(f"awk '/^Uid:/ {{print $2}}' /proc/{guest.show()['MainPID']}/status").stdout.strip()
    assert main_uid != "0"


def test_control_socket_answers_root_and_refuses_other_users(guest, service, broker):
    topic, _ = service()
    guest.sh("systemctl start consumerd")
    [mid] = broker.publish(topic, data={"seconds": 5}, task="sleep")
    deadline = time.monotonic() + 30
    while mid not in guest.ledger_ids("start"):
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.1)
    # As root, with no option: the CLI finds /run/consumerd/control.sock (RuntimeDirectory=consumerd).
    status = json.loads(guest.sh("/opt/consumerd/bin/consumerd status --json").stdout)
    assert status["state"] == "running" and [job["message_id"] for job in status["running"]] == [mid]
    assert guest.sh("stat -c %a /run/consumerd/control.sock").stdout.strip() == "600"
    refused = guest.sh("setpriv --reuid=65534 --regid=65534 --clear-groups /opt/consumerd/bin/consumerd status", check=False)
    assert refused.returncode == 1 and "Permission denied" in refused.stderr
    paused = guest.sh("/opt/consumerd/bin/consumerd pause --json")
    assert json.loads(paused.stdout) == {"ok": True, "paused": True}
    metrics = guest.sh(
        "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())\""
    )
    assert f'consumerd_build_info{{version="{consumerd.__version__}"}} 1.0' in metrics.stdout


def test_task_code_cannot_read_the_supervisors_memory_environment_or_credential_variables(guest, service, broker):
    guest.sh("mkdir -p /etc/systemd/system/consumerd.service.d")
    guest.write("/etc/consumerd/probe-credential", "not a real key\n")
    guest.write("/etc/systemd/system/consumerd.service.d/probe.conf", "[Service]\nLoadCredential=probe:/etc/consumerd/probe-credential\n")
    guest.sh("systemctl daemon-reload")
    try:
        topic, _ = service()
        guest.sh("systemctl start consumerd")
        [mid] = broker.publish(topic, task="snoop")
        _wait_ids(guest, [mid])
        events = {parts[0] for parts in guest.ledger()}
        for name in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC"):  # the supervisor has all three
            assert f"env:{name}:absent" in events, events
        # Non-dumpable, its /proc entries are root's: ProtectProc=invisible then hides them altogether
        # (FileNotFoundError); without ProtectProc they are refused (PermissionError). Never opened.
        assert {e.rsplit(":", 1)[0] for e in events if e.startswith("denied:")} == {"denied:environ", "denied:mem", "denied:credential"}, (
            events
        )
        assert "denied:credential:PermissionError" in events  # there, but Landlock keeps tasks out
        assert not [e for e in events if e.startswith("opened:")]
        # The supervisor itself still reads it (the daemon would not start otherwise with a real key).
        hidden = guest.sh("journalctl -u consumerd -o cat --no-pager | grep -c workers.credentials_hidden", check=False).stdout.strip()
        assert int(hidden or 0) >= 1, guest.journal_text()[-3000:]
    finally:
        guest.sh("systemctl stop consumerd; rm -f /etc/systemd/system/consumerd.service.d/probe.conf; systemctl daemon-reload")


def test_load_credential_key_over_tls_with_a_token_on_every_rpc(guest, service, broker, production, emulator):
    """The production path under systemd: the key comes in through LoadCredential=, only the service reads it."""
    key = production.account.path
    guest.write("/etc/consumerd/pubsub-key.json", key.read_text())
    guest.write("/etc/consumerd/test-ca.pem", production.authority.ca_file.read_text())
    guest.sh("chmod 600 /etc/consumerd/pubsub-key.json; mkdir -p /etc/systemd/system/consumerd.service.d")
    guest.write(
        "/etc/systemd/system/consumerd.service.d/key.conf", "[Service]\nLoadCredential=pubsub-key.json:/etc/consumerd/pubsub-key.json\n"
    )
    default = guest.sh("cat /etc/default/consumerd").stdout
    # No PUBSUB_EMULATOR_HOST: the daemon takes the TLS path to the proxy and trusts the test CA.
    production_env = [line for line in default.splitlines() if not line.startswith("PUBSUB_EMULATOR_HOST=")]
    guest.write("/etc/default/consumerd", "\n".join([*production_env, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/etc/consumerd/test-ca.pem", ""]))
    guest.sh("systemctl daemon-reload")
    try:
        topic, _ = service(pubsub={"endpoint": production.endpoint, "credentials_file": "pubsub-key.json"})
        guest.sh("systemctl start consumerd")
        invocation = guest.sh("systemctl show consumerd -p InvocationID --value").stdout.strip()
        ids = broker.publish(topic, 5, task="ok")
        _wait_ids(guest, ids)
        guest.sh("systemctl stop consumerd")
        this_run = guest.sh(f"journalctl _SYSTEMD_INVOCATION_ID={invocation} --no-pager -o cat").stdout
        calls = production.proxy.recorded()
        assert calls and [c for c in calls if c.refusal] == [] and {c.kind for c in calls} == {"token"}
        assert {"GetSubscription", "Pull", "Acknowledge"} <= {c.name for c in calls}
        assert production.tokens.refused == [] and len(production.tokens.issued) >= 1
        assert "pubsub.subscribed" in this_run and "pubsub.unreachable" not in this_run, this_run[-3000:]
    finally:
        guest.write("/etc/default/consumerd", default)
        guest.sh("rm -f /etc/consumerd/pubsub-key.json /etc/consumerd/test-ca.pem", check=False)


def test_an_install_puts_consumerd_on_path_and_its_documentation_where_the_unit_says(guest):
    assert guest.sh("command -v consumerd").stdout.strip() == "/usr/local/bin/consumerd"
    assert guest.sh("consumerd --version").returncode == 0
    docs = guest.sh("systemctl show -p Documentation --value consumerd.service").stdout.split()
    # The HTML site is the .deb's (make deb builds it); both installers copy the README.
    assert docs == ["file:///usr/share/doc/consumerd/html/index.html", "file:/opt/consumerd/share/doc/consumerd/README.md"]
    assert guest.sh("test -s /opt/consumerd/share/doc/consumerd/README.md").returncode == 0
    assert guest.sh("touch /opt/src/x", check=False).returncode != 0  # it was installed from a read-only checkout


def test_the_scripts_refuse_what_could_hurt_the_host(guest):
    for args, code in (("--prefx /x", 64), ("--prefix /usr", 65), ("--prefix relative/path", 64), ("--prefix", 64)):
        refused = guest.sh(f"bash /opt/src/deploy/uninstall.sh {args}", check=False)
        assert refused.returncode == code, (args, refused.stdout, refused.stderr)
    assert guest.sh("test -x /opt/consumerd/bin/consumerd && test -x /usr/bin/env").returncode == 0  # nothing removed
    for args in ("--prefix '/opt/x y'", "--prefix '/opt/a|b'", "--prefix /usr", "--prefix /opt/../etc", "--bogus"):
        refused = guest.sh(f"bash /opt/src/deploy/install.sh {args}", check=False)
        assert refused.returncode == 64, (args, refused.stdout, refused.stderr)


def test_uninstall_disables_every_instance_and_keeps_the_configuration(guest, service):
    # Last in this module: it removes the installation the other tests use.
    service()
    guest.sh("cp /etc/consumerd.toml /etc/consumerd/demo.toml && systemctl enable consumerd@demo.service")
    assert guest.sh("ls /etc/systemd/system/*.wants/consumerd@demo.service", check=False).returncode == 0
    removed = guest.sh("bash /opt/src/deploy/uninstall.sh")
    assert "consumerd removed" in removed.stdout
    assert guest.sh("test -e /opt/consumerd", check=False).returncode != 0
    assert guest.sh("ls /etc/systemd/system/*.wants/consumerd@demo.service", check=False).returncode != 0
    assert guest.sh("test -f /etc/consumerd.toml && test -f /etc/consumerd/demo.toml").returncode == 0
    assert guest.sh("test -e /usr/local/bin/consumerd", check=False).returncode != 0  # its PATH link went too

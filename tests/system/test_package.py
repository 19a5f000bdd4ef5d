"""The Debian package (`make deb`) installed, run, reloaded, removed and purged under a real systemd."""

from __future__ import annotations

import time

import pytest

from bench.fleet import deb
from harness.daemon import REPO
from tests.system.conftest import STATE_DIR

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def package() -> str:
    """The package built from this tree (built now, as CI does with `make deb`, if it is not there),
    where the guest sees the checkout."""
    return f"/opt/src/dist/{deb().name}"


def wait_done(guest, ids, timeout=60):
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(guest.ledger_ids("done")):
        assert time.monotonic() < deadline, f"not done: {guest.ledger()}\n{guest.journal_text()[-3000:]}"
        time.sleep(0.2)


def test_the_package_installs_runs_reloads_stops_on_remove_and_purges(bare_guest, service, broker, package):
    g = bare_guest
    # This machine is a container image whose policy-rc.d forbids maintainer scripts to touch services
    # (apt honours it, as it should); the guest stands for a real host, which has none.
    g.sh("rm -f /usr/sbin/policy-rc.d")
    g.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package}", timeout=300)
    # Installed, on PATH, units in /lib, the config a conffile, and an unconfigured daemon not started.
    assert g.sh("command -v consumerd").stdout.strip() == "/usr/bin/consumerd"
    assert g.sh("test -f /lib/systemd/system/consumerd.service && test -f /lib/systemd/system/consumerd@.service").returncode == 0
    assert "/etc/consumerd.toml" in g.sh("dpkg-query -W -f='${Conffiles}' consumerd").stdout
    assert g.sh("systemctl is-active consumerd", check=False).stdout.strip() == "inactive"
    assert g.sh("systemctl is-enabled consumerd", check=False).stdout.strip() == "disabled"
    grpc = g.sh("/opt/consumerd/bin/python -c 'import grpc; print(grpc.__version__)'").stdout.strip()
    assert f"\ngrpcio=={grpc} " in (REPO / "deploy/requirements.lock").read_text()  # the locked version

    topic, _ = service()
    g.sh("systemctl start consumerd")
    ids = broker.publish(topic, 3, task="ok")
    wait_done(g, ids)
    g.sh("systemctl reload consumerd")
    deadline = time.monotonic() + 20
    while not g.journal("CONSUMERD_EVENT=reload.done"):
        assert time.monotonic() < deadline, g.journal_text()[-2000:]
        time.sleep(0.2)
    more = broker.publish(topic, 2, data={"seconds": 1}, task="sleep")
    wait_done(g, more)

    # remove: the service is stopped (it drains), the program goes, the configuration stays.
    g.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q consumerd", timeout=300)
    assert g.journal("CONSUMERD_EVENT=daemon.stopped"), "remove did not stop the service"
    assert g.sh("systemctl is-active consumerd", check=False).stdout.strip() in ("inactive", "unknown")
    assert g.sh("test -e /opt/consumerd/bin/consumerd", check=False).returncode != 0
    assert g.sh("test -f /etc/consumerd.toml").returncode == 0
    # purge: configuration and state go too.
    g.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q consumerd", timeout=300)
    assert g.sh("test -e /etc/consumerd.toml", check=False).returncode != 0
    assert g.sh(f"test -e /var/lib/private/consumerd || test -e {STATE_DIR}/ledger.txt", check=False).returncode != 0

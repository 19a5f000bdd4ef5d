"""The image as `make image` leaves it: a small archive that loads, and what its config says."""

from __future__ import annotations

import json

import pytest

from tests.container.runtime import ARCHIVE, IMAGE, UID, podman

pytestmark = pytest.mark.container


def test_the_archive_loads_and_the_image_holds_no_build_tools(image):
    if not ARCHIVE.exists():
        pytest.skip(f"{ARCHIVE} not there: `make image` writes it")
    loaded = podman("load", "--quiet", "--input", str(ARCHIVE), timeout=300)
    assert loaded.stdout.strip() == f"Loaded image: {IMAGE}"
    [config] = json.loads(podman("image", "inspect", IMAGE).stdout)
    assert config["Config"]["Entrypoint"] == ["/usr/bin/tini", "--", "/opt/consumerd/bin/consumerd"]
    assert config["Config"]["Cmd"] == ["run"] and config["Config"]["User"] == f"{UID}:{UID}"
    env = config["Config"]["Env"]
    assert {"CONSUMERD_SHUTDOWN__DRAIN_TIMEOUT=20", "CONSUMERD_SHUTDOWN__KILL_GRACE=3", "CONSUMERD_SHUTDOWN__FLUSH_TIMEOUT=5"} <= set(env)
    probe = "import os, shutil; print([t for t in ('gcc', 'cc', 'make', 'git') if shutil.which(t)], os.path.exists('/wheels'))"
    found = podman("run", "--rm", "--read-only", "--network=none", "--entrypoint", "/opt/consumerd/bin/python", IMAGE, "-c", probe)
    assert found.stdout.strip() == "[] False"  # no compilers or build tools, no wheelhouse left behind
    size = ARCHIVE.stat().st_size
    print(f"\n[container] {ARCHIVE.name}: {size / 1e6:.0f} MB ({config['Size'] / 1e6:.0f} MB unpacked)")
    assert size < 200e6

"""examples/container: tasks packaged and installed into an image built FROM the consumerd image."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from harness.daemon import REPO
from tests.container.runtime import podman

pytestmark = pytest.mark.container
EXAMPLE = REPO / "examples" / "container"


@pytest.fixture
def example_image(image, tmp_path):
    """The example built as its Containerfile says: the wheel first, then `podman build --network=none`."""
    context = tmp_path / "context"
    shutil.copytree(EXAMPLE, context, ignore=shutil.ignore_patterns("build", "*.egg-info", "wheels"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(context / "wheels"), str(context / "tasks")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    tag = f"localhost/consumerd-example:test-{tmp_path.name}"
    build = ["build", "--quiet", "--pull=never", "--network=none", "--build-arg", f"CONSUMERD_IMAGE={image}"]
    podman(*build, "-t", tag, str(context), timeout=300)
    yield tag
    podman("rmi", "--force", tag, check=False)


def test_an_image_built_from_it_runs_the_packaged_tasks(containers, broker, topic_sub, example_image):
    listing = podman("run", "--rm", "--read-only", example_image, "tasks").stdout
    assert "word_count" in listing and "example_tasks.tasks" in listing
    topic, sub = topic_sub()
    # Its tasks come from the package's entry point: no CONSUMERD_TASKS__MODULES needed.
    box = containers(sub, "example", env={"CONSUMERD_TASKS__MODULES": "[]"}, image=example_image)
    box.wait_ready(timeout=60)
    ids = broker.publish(topic, 3, data=b"three small words", task="word_count")
    counted = box.wait_for_ids("example.counted", set(ids), timeout=30)
    assert {event["words"] for event in counted} == {3}
    seconds, code = box.stop_timed(30)
    assert code == 0

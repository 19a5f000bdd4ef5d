"""A task module that takes a while to import: the daemon stays in `starting` meanwhile."""

import os
import time

from consumerd import Message, task

time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "3")))


@task("slow_ok")
def slow_ok(msg: Message) -> None:
    pass

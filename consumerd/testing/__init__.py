"""What users' own tests use: `run_task` and `make_message`, the pytest plugin's fixtures
(`consumerd.testing.pytest_plugin`), and the Pub/Sub emulator on a free loopback port (`emulator`).

Importable with consumerd's own dependencies alone; the worker code `run_task` runs is loaded on
first use, so importing the emulator helper alone never loads it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumerd.testing.messages import make_message
    from consumerd.testing.outcomes import Published, TaskOutcome
    from consumerd.testing.runner import run_task

__all__ = ["Published", "TaskOutcome", "make_message", "run_task"]

_HOMES = {"make_message": "messages", "Published": "outcomes", "TaskOutcome": "outcomes", "run_task": "runner"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'consumerd.testing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"consumerd.testing.{_HOMES[name]}"), name)

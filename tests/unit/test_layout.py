"""The shape the next engineer relies on: folders by role, one noun per module, none over 400 lines."""

import importlib
from pathlib import Path

import consumerd

PACKAGE = Path(__file__).resolve().parents[2] / "consumerd"


def test_no_module_is_over_400_lines():
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(sizes) > 40 and "worker/forkserver.py" in sizes
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_every_public_name_imports_from_the_top():
    for name in consumerd.__all__:
        assert getattr(consumerd, name) is not None, name
    assert consumerd.task.__module__ == "consumerd.worker.registry"
    assert importlib.import_module("consumerd.worker.forkserver").ForkServer.__name__ == "ForkServer"

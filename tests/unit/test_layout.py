"""The shape the next engineer relies on: one noun per module, none over 400 lines."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "consumerd"


def test_no_module_is_over_400_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert len(sizes) > 30
    assert {name: n for name, n in sizes.items() if n > 400} == {}

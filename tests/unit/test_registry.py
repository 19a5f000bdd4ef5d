import sys
import textwrap

import pytest

from consumerd.errors import RegistryError
from consumerd.worker.registry import REGISTRY, Registry, load_task_modules, task


@pytest.fixture
def modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def make(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)
    REGISTRY.clear()


def test_register_and_lookup():
    registry = Registry()

    def handler(msg):
        return None

    registry.register("a", handler)
    registry.register("a", handler)  # the same function again (a re-import) is fine
    assert registry.get("a").func is handler and "a" in registry
    assert registry.get("missing") is None


def test_duplicate_name_names_both_origins():
    registry = Registry()
    registry.register("a", lambda m: None)
    with pytest.raises(RegistryError, match="registered twice"):
        registry.register("a", lambda m: None)


def test_load_modules_registers_their_tasks(modules):
    name = modules(
        "regmod_ok",
        """
        from consumerd import task

        @task("resize")
        def resize(msg):
            pass
    """,
    )
    registry = load_task_modules([name], entry_points=False)
    [spec] = registry.specs()
    assert spec.name == "resize" and "regmod_ok.resize" in spec.origin and "regmod_ok.py:4" in spec.origin


def test_duplicate_across_modules_is_a_registry_error(modules):
    a = modules("regmod_a", "from consumerd import task\n@task('same')\ndef one(m): pass\n")
    b = modules("regmod_b", "from consumerd import task\n@task('same')\ndef two(m): pass\n")
    with pytest.raises(RegistryError, match="'same' is registered twice"):
        load_task_modules([a, b], entry_points=False)


def test_missing_module_is_a_registry_error():
    with pytest.raises(RegistryError, match="tasks.modules: cannot import 'no_such_mod_q'"):
        load_task_modules(["no_such_mod_q"], entry_points=False)


def test_module_raising_at_import_is_a_registry_error(modules):
    name = modules("regmod_boom", "raise RuntimeError('boom at import')\n")
    with pytest.raises(RegistryError, match="importing 'regmod_boom' failed: RuntimeError: boom at import"):
        load_task_modules([name], entry_points=False)


def test_task_decorator_rejects_bad_names():
    with pytest.raises(RegistryError):
        task("")(lambda m: None)

"""The shape the next engineer relies on: folders by role, one noun per module, none over 400 lines."""

import ast
import importlib
import sys
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


# -- the layering, beside the import-linter contracts in pyproject.toml (`make lint` runs both) ----
def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    parts = parts[len(parts) - 1 - parts[::-1].index("consumerd") :]  # from the last "consumerd" folder on
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``path`` imports: at the top, inside functions, under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in root.rglob("*.py")}
    known = set(paths)
    return {name: {i for i in imports_of(path, known) if i in known and i != name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_counting_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "consumerd.control.commands" in graph and "consumerd.supervisor.loop" in graph
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_hidden_under_type_checking():
    graph = import_graph()
    graph["consumerd.policy.leases"] = graph["consumerd.policy.leases"] | {"consumerd.supervisor.loop"}
    assert any("consumerd.policy.leases" in component for component in cycles(graph))


def outside_imports(path: Path) -> set[str]:
    """What ``path`` imports that is neither the standard library, consumerd.ipc nor policy itself."""
    known = set(import_graph())
    bad = set()
    for name in imports_of(path, known):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or name.startswith(("consumerd.ipc", "consumerd.policy")):
            continue
        bad.add(name)
    return bad


def test_policy_imports_only_the_standard_library_and_ipc():
    policy = sorted((PACKAGE / "policy").glob("*.py"))
    assert len(policy) >= 8
    assert {str(p.name): outside_imports(p) for p in policy if outside_imports(p)} == {}


def test_the_policy_check_would_catch_a_third_party_or_upward_import(tmp_path):
    fake = tmp_path / "consumerd" / "policy"
    fake.mkdir(parents=True)
    (fake / "flow.py").write_text(
        "import math\nfrom consumerd.ipc.records import Outcome\nfrom consumerd.policy import backoff\nimport structlog\nfrom consumerd.config import Settings\n"
    )
    assert outside_imports(fake / "flow.py") == {"structlog", "consumerd.config"}

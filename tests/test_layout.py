"""The tree shows the architecture: the seed's front doors work, and imports run one way."""

from __future__ import annotations

import ast
import importlib

import pytest
from conftest import ROOT

FRONT_DOORS = ("app", "config", "backend_manager", "webhook_routes", "test_b_client")
# From the wings users call down to the fleet; a module may import its own rank or lower.
RANKS = {
    "app": 6,
    "serve": 6,
    "gunicorn_conf": 6,
    "cli": 6,
    "cli_jobs": 6,
    "cli_options": 6,
    "cli_allocations": 6,
    "client": 6,
    "migrate": 6,
}  # the process and the operator's tool
RANKS |= {"api": 5, "proxy": 4, "jobs": 4, "allocations": 4, "manager": 3, "routing": 2, "fleet": 1, "cluster": 0}
RANKS |= {"manager_changes": 3, "manager_results": 3, "manager_reads": 3, "manager_cluster": 3}  # the manager's sides
SHARED = ("config", "config_values", "errors", "observability")  # beside the wings: anyone may import them


def part(module: str) -> str:
    """`gateway.fleet.store` -> `fleet`; `gateway.manager` -> `manager`."""
    return module.split(".")[1]


def type_only(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: imports for annotations, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def gateway_imports(path) -> set[str]:
    """The modules a file imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if type_only(node):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


MODULES = sorted(p for p in (ROOT / "gateway").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_from_the_users_wings_down_to_the_fleet(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    imported = gateway_imports(path)
    assert not imported & set(FRONT_DOORS), f"{module} imports a front door"
    for target in sorted(i for i in imported if i.startswith("gateway.")):
        if part(target) in SHARED:
            continue
        if part(module) in SHARED:  # shared pieces reach only the fleet's pure helpers and Redis's errors
            assert part(target) in ("fleet", "cluster"), f"{module} imports {target}"
            continue
        assert RANKS[part(target)] <= RANKS[part(module)], f"{module} reaches up to {target}"


def test_the_seeds_imports_still_work():
    import gateway.manager
    from backend_manager import BackendManager, backend_manager
    from webhook_routes import register_webhook_routes

    assert isinstance(backend_manager, BackendManager)
    assert backend_manager is gateway.manager.backend_manager
    assert callable(register_webhook_routes)
    for name in FRONT_DOORS:
        importlib.import_module(name)


def test_importing_the_app_front_door_builds_nothing():
    app = importlib.import_module("app")
    assert "app" not in vars(importlib.import_module("gateway.app"))
    assert callable(app.create_app)


def test_the_root_holds_the_front_doors_the_wings_and_supporting_folders():
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    assert modules == sorted(FRONT_DOORS)

"""The layer rule, checked on every product module's imports (including the
late imports inside functions):

- `domain/` imports none of payfleet's other packages, nor a framework;
- `payfleet/platform/` (settings, database, broker, publishing) imports only `domain/`;
- `ingress/`, `workers/` and `schedules/` never import one another, nor the CLI;
- `payfleet/cli/`, the composition root, may import everything; nothing imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("domain", "payfleet", "ingress", "workers", "schedules")
PROCESSES = ("ingress", "workers", "schedules")
FRAMEWORKS = ("falcon", "dramatiq", "pika", "gunicorn", "prometheus_client")


def layer(module: str) -> str:
    """The layer a dotted module name belongs to, or '' for a third-party one."""
    parts = module.split(".")
    if parts[0] == "payfleet":
        return "payfleet.cli" if parts[1:2] == ["cli"] else "payfleet.platform"
    return parts[0] if parts[0] in PACKAGES else ""


def allowed(importer: str, imported: str) -> bool:
    mine, theirs = layer(importer), layer(imported)
    top = imported.split(".")[0]
    if mine == "domain":
        return theirs in ("", "domain") and top not in FRAMEWORKS
    if mine == "payfleet.platform":
        return theirs in ("", "domain", "payfleet.platform")
    if mine in PROCESSES:
        return theirs in ("", "domain", "payfleet.platform", mine)
    return True  # the CLI


def imports_of(source: str, module: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = module.split(".")[: -node.level]
                found.append(".".join([*base, node.module or ""]).rstrip("."))
            else:
                assert node.module is not None
                # `from payfleet import cli` imports payfleet.cli.
                found.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def reads_environment(source: str) -> bool:
    return any(
        isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
        for node in ast.walk(ast.parse(source))
    )


def product_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules.append((dotted.removesuffix(".__init__"), path))
    return modules


def broken_rules(modules: list[tuple[str, Path]]) -> list[str]:
    broken = []
    for module, path in modules:
        source = path.read_text()
        broken += [
            f"{module} imports {target}"
            for target in imports_of(source, module)
            if not allowed(module, target)
        ]
        if layer(module) == "domain" and reads_environment(source):
            broken.append(f"{module} reads the environment")
    return broken


def test_no_product_module_imports_across_the_layers():
    modules = product_modules()
    assert len(modules) > 40, "the walk found the product modules"
    assert broken_rules(modules) == []


def test_only_the_settings_read_the_environment():
    readers = [m for m, path in product_modules() if reads_environment(path.read_text())]
    # The gunicorn hook translates settings into the variable prometheus-client
    # reads; the worker's exporter takes its port from the settings.
    assert sorted(readers) == ["ingress.gunicorn_conf", "payfleet.platform.config"]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("ingress.webhooks", "from workers.apply_events import declare_event_actors"),
        ("schedules.claims", "def f():\n    import workers.job_runner"),
        ("workers.main", "from ingress import app"),
        ("domain.orders", "import falcon"),
        ("domain.orders", "from payfleet.platform.config import Settings"),
        ("domain.orders", "import os\nX = os.environ['A']"),
        ("payfleet.platform.db", "from schedules import claims"),
        ("ingress.app", "from payfleet import cli"),
        ("workers.apply_events", "from ..ingress import app"),
    ],
)
def test_the_check_catches_a_crossing(tmp_path, module, source):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert broken_rules([(module, path)]) != []

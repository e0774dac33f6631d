"""The library stands alone: `fastdraft/` never imports the checkout's `apps/` or `jobs/`, and installing
fastdraft puts only the `fastdraft` package into site-packages (no generic top-level `apps`/`jobs`)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKOUT_ONLY = ("apps", "jobs")


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names (at any depth: lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_library_module_imports_apps_or_jobs():
    offenders = {}
    for path in sorted((REPO / "fastdraft").rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in CHECKOUT_ONLY}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}, f"the library imports checkout-only code: {offenders}"


def test_the_cli_resolves_every_stage_without_loading_apps_or_jobs():
    # importlib-style imports (the CLI's STAGES table) escape the AST check: load every stage for real.
    code = ("import sys, fastdraft.cli as c\n"
            "[c.resolve_stage(s) for s in c.STAGES]\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {CHECKOUT_ONLY!r}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_only_the_fastdraft_package_is_installed():
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(REPO), include=config["packages"]["find"]["include"])
    assert "fastdraft.serving" in packages
    assert [p for p in packages if p.split(".")[0] != "fastdraft"] == []
    assert not set(config.get("package-data", {})) - {p for p in packages}, "package data for a package not installed"


def test_serve_run_apps_speculative_is_the_librarys_app_builder():
    from apps import speculative
    from fastdraft.serving import app

    assert speculative.build_app is app.build_app

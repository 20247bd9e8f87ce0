"""What the package ships: portproxy and its subpackages (the lab that ``portproxy demo`` and
``portproxy bench`` need among them), never the tests' harness."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages, find_packages

CHECKOUT = Path(__file__).resolve().parents[2]


def shipped_packages() -> list[str]:
    """The packages setuptools puts in the wheel (and pybuild in the .deb), per pyproject.toml
    (where ``namespaces`` is true unless it says otherwise: directories without __init__.py count)."""
    find = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    return finder(str(CHECKOUT), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))


def test_the_finder_would_see_the_tests_if_asked() -> None:
    """The control: the same finder, unrestricted, finds the test harness."""
    assert "tests.support" in find_namespace_packages(str(CHECKOUT), include=["*"])


def test_the_wheel_holds_the_package_and_its_lab_but_no_tests() -> None:
    packages = shipped_packages()
    assert "portproxy" in packages and "portproxy.lab" in packages and "portproxy.bench" in packages
    assert [p for p in packages if not p.startswith("portproxy")] == []


def test_the_package_never_imports_the_tests() -> None:
    for path in sorted((CHECKOUT / "portproxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "tests" or n.startswith("tests.") for n in names), path

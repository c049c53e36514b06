"""Docs that match the code: every environment variable the package reads is in the README."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _variables_in_code() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "app" / "src" / "gpu_bridge").rglob("*.py"):
        names |= set(re.findall(r'"((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)"', path.read_text()))
    return names


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)`", readme))
    missing = sorted(_variables_in_code() - documented)
    assert not missing, f"README.md lacks these settings: {missing}"


def test_readme_documents_no_setting_the_code_does_not_read():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)`", readme, re.M))
    unknown = sorted(documented - _variables_in_code())
    assert not unknown, f"README.md documents settings no code reads: {unknown}"


def test_readme_gives_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "scripts/lab up" in readme and "scripts/test" in readme
    assert (REPO / "scripts" / "test").exists() and (REPO / "scripts" / "lab").exists()
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test" in ci

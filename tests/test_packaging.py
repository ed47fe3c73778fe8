"""Packaging: every package under agent/ and hal/ is found from pyproject.toml's `find` rule (a
new subpackage ships without anyone listing it), and nothing else is."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _find(where: Path) -> set[str]:
    rule = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert rule["find"].get("namespaces") is False  # a directory needs its __init__.py
    return set(find_packages(where=str(where), include=rule["find"]["include"]))


def test_every_source_directory_is_a_package_that_ships() -> None:
    source_dirs = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("agent", "hal")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    for name in source_dirs:
        assert (ROOT / name.replace(".", "/") / "__init__.py").is_file(), name
    assert _find(ROOT) == source_dirs
    assert {"agent.cli", "agent.est", "agent.firmware", "hal.bootloader"} <= source_dirs


def test_a_new_subpackage_is_found_and_tests_are_not(tmp_path: Path) -> None:
    for name in (
        "agent",
        "agent/daemon",
        "agent/mqtt",
        "agent/mqtt/wire",
        "hal",
        "tests",
        "tests/support",
    ):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "__init__.py").write_text("")
    assert _find(tmp_path) == {"agent", "agent.daemon", "agent.mqtt", "agent.mqtt.wire", "hal"}

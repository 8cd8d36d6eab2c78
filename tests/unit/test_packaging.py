"""berth installs as one top-level package, ``berth``: every package folder is mapped."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_under_berth() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        "berth." + ".".join(init.parent.relative_to(REPO).parts)
        for top in ("core", "plugins")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - on_disk == set(), "these listed packages have no folder"


def test_package_dir_maps_the_fixed_folders() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"berth.core": "core", "berth.plugins": "plugins"}
    scripts = _pyproject()["project"]["scripts"]
    assert all(target.startswith("berth.") for target in scripts.values())

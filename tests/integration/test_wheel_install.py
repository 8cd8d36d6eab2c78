"""The built wheel, installed into a fresh venv, claims only ``berth`` and works beside a
package of the user's that is called ``core`` (and one called ``plugins``)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheels.glob("berth-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )
    site = Path(subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    ours = {p.name for p in site.iterdir() if p.name.startswith(("berth", "core", "plugins"))}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"berth"}

    # A user's own top-level `core` and `plugins` packages must not shadow berth's.
    user = tmp_path / "user"
    for name in ("core", "plugins"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text("MINE = True\n")
    probe = (
        "import core, plugins, berth.core.daemon, berth.plugins.differ.plugin\n"
        "assert core.MINE and plugins.MINE\n"
        "print(berth.core.daemon.__file__)\n"
    )
    out = subprocess.run([str(py), "-c", probe], cwd=user, check=True, capture_output=True,
                         text=True, timeout=120)
    assert str(site) in out.stdout
    for script in ("berthd", "berth", "containerd-shim-berth-v1"):
        assert (env_dir / "bin" / script).exists()
    help_out = subprocess.run([str(env_dir / "bin" / "berthd"), "--help"], cwd=user,
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0, help_out.stderr

"""Regenerate the betterproto modules in core/api from the .proto files next to this script.

Usage: python proto/generate.py [--out DIR]   (default DIR: core/api)

Output depends only on the .proto files and the pinned tool versions: inputs are passed in
sorted order and the output directory is emptied first, so a stale module cannot survive the
removal of its .proto.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
DEFAULT_OUT = REPO_ROOT / "core" / "api"
PLUGIN_NAME = "protoc-gen-python_betterproto"
# Files we allow ourselves to delete when cleaning the output directory; anything else means
# --out points somewhere it should not.
GENERATED_SUFFIXES = (".py", ".pyc")


def proto_files() -> list[str]:
    """Every .proto below proto/, relative to it, in a stable order."""
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def find_plugin() -> str:
    # Prefer the plugin installed beside this interpreter (the venv), then PATH.
    beside = Path(sys.executable).parent / PLUGIN_NAME
    if beside.is_file():
        return str(beside)
    found = shutil.which(PLUGIN_NAME)
    if found is None:
        raise SystemExit(f"{PLUGIN_NAME} not found; install betterproto[compiler]==2.0.0b7")
    return found


def well_known_include() -> str:
    """Directory holding google/protobuf/*.proto, as shipped by grpcio-tools."""
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def clean(out: Path) -> None:
    if not out.exists():
        return
    strangers = [
        p for p in out.rglob("*") if p.is_file() and not p.name.endswith(GENERATED_SUFFIXES)
    ]
    if strangers:
        raise SystemExit(
            f"refusing to clean {out}: it holds non-generated files, e.g. {strangers[0]}"
        )
    shutil.rmtree(out)


def add_package_markers(out: Path) -> None:
    """betterproto only writes __init__.py where a proto package lives; add the missing levels."""
    for directory in sorted([out, *(p for p in out.rglob("*") if p.is_dir())]):
        if directory.name == "__pycache__":
            continue
        marker = directory / "__init__.py"
        if not marker.exists():
            marker.write_text("")


def run_protoc(out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known_include()}",
        f"--plugin={PLUGIN_NAME}={find_plugin()}",
        f"--python_betterproto_out={out}",
        *(str(PROTO_DIR / name) for name in proto_files()),
    ]
    # The plugin formats its output with isort, which looks for configuration upwards from the
    # working directory; run from an empty temporary directory so no project's isort settings
    # leak into the result.
    with tempfile.TemporaryDirectory() as neutral_cwd:
        done = subprocess.run(
            cmd,
            cwd=neutral_cwd,
            env=dict(os.environ, PYTHONHASHSEED="0"),
            stderr=subprocess.PIPE,
            text=True,
        )
    # The plugin announces every file it writes on stderr; keep only what is worth reading.
    noise = re.compile(r"^Writing \S+$")
    for line in done.stderr.splitlines():
        if not noise.match(line):
            print(line, file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed with exit status {done.returncode}")


def generate(out: Path) -> None:
    """Write the modules into a fresh sibling directory, then swap it in, so a broken .proto
    leaves the previous output in place."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result should read like any package
    try:
        run_protoc(staging)
        add_package_markers(staging)
        clean(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    main()

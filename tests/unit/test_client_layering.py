"""The client/server split: a file's path tells its concurrency model (core/client's rule).

- core/client and core/cli (asyncio) are never imported by berthd's side of core;
- the shared vocabulary (core/images, core/archive) has no event loop and no I/O library;
- none of them imports a plugin;
- importing every client and CLI module loads neither trio nor trio-asyncio (unpacking
  still reaches core.snapshots' label rule, whose package loads the metadata stores).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"
CLIENT_SIDE = (CORE / "client", CORE / "cli")
VOCABULARY = (CORE / "images", CORE / "archive")


def _files(*dirs: Path) -> Iterator[Path]:
    for d in dirs:
        yield from sorted(d.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _under(path: Path, dirs: tuple[Path, ...]) -> bool:
    return any(d in path.parents for d in dirs)


def test_server_side_never_imports_the_client_side() -> None:
    server = [p for p in _files(CORE) if not _under(p, CLIENT_SIDE)
              and CORE / "api" not in p.parents]
    assert server
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if
                                            m.startswith(("berth.core.client",
                                                          "berth.core.cli")))
           for p in server}
    assert {k: v for k, v in bad.items() if v} == {}


def test_client_and_vocabulary_never_import_a_plugin() -> None:
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                            if m.startswith("berth.plugins"))
           for p in _files(*CLIENT_SIDE, *VOCABULARY)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_vocabulary_has_no_event_loop() -> None:
    loops = ("asyncio", "trio", "trio_asyncio", "grpclib", "httpx", "anyio")
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                            if m.split(".")[0] in loops)
           for p in _files(*VOCABULARY)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_client_side_loads_no_trio() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import berth.core.client as c, berth.core.cli as cli\n"
        "for pkg in (c, cli):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('trio', 'trio_asyncio')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out == "[]\n"

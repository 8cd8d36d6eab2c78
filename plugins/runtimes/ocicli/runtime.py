"""The OCIRuntime protocol over a runc-compatible command line (runc, crun).

Each call is one invocation of the binary, as containerd's go-runc makes them:
``<binary> --root R --log L --log-format json [--systemd-cgroup] <command> ...``.
``create`` and ``exec`` hand the container's stdio to the binary, which passes it on
to the container; their errors are taken from the JSON log (the last ``error`` line
this call wrote), the way containerd reports "OCI runtime create failed: <msg>".
Other commands have their output captured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from berth.core import errdefs
from berth.core.oci.reaper import Reaper
from berth.core.oci.runtime import State, Stdio
from berth.plugins.runtimes.ocicli import command
from berth.plugins.runtimes.ocicli.stats import from_events

DEFAULT_BINARY = "runc"


def resolve(binary: str) -> str:
    """An absolute path for ``binary`` (a name is looked up on PATH, like exec.Command)."""
    if os.sep in binary:
        if os.access(binary, os.X_OK):
            return os.path.abspath(binary)
    else:
        found = shutil.which(binary)
        if found:
            return os.path.abspath(found)
    raise errdefs.NotFound(f'exec: "{binary}": executable file not found in $PATH', raw=True)


def classify(message: str, what: str, *, lookup: bool = True) -> errdefs.BerthError:
    """The typed error for a runtime's message (the wording differs between runc and crun).

    ``lookup`` says the command only looks an existing container up, so a missing state
    file (crun: "error opening file `<root>/<id>/status`: No such file or directory")
    means the container does not exist.
    """
    text = message.strip() or f"{what} failed"
    low = text.lower()
    if "does not exist" in low or (lookup and "no such file or directory" in low):
        return errdefs.NotFound(text, raw=True)
    if "already exists" in low:
        return errdefs.AlreadyExists(text, raw=True)
    if ("not running" in low or "not paused" in low or "is paused" in low
            or "is not stopped" in low or "cannot" in low or "process already finished" in low
            or "no such process" in low or "is stopped" in low):
        return errdefs.FailedPrecondition(text, raw=True)
    return errdefs.Unknown(text, raw=True)


def _parse_time(value: str) -> datetime:
    if not value:
        return datetime.fromtimestamp(0, UTC)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        # Go prints up to nine fractional digits; trim to what Python reads.
        head, _, frac = value.partition(".")
        digits = "".join(c for c in frac if c.isdigit())[:6]
        zone = frac[len("".join(c for c in frac if c.isdigit())):] or "+00:00"
        return datetime.fromisoformat(f"{head}.{digits or '0'}{zone.replace('Z', '+00:00')}")


class Runtime:
    """A runc-compatible binary as an ``OCIRuntime``; children are reaped by ``reaper``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        reaper: Reaper,
        *,
        binary: str = DEFAULT_BINARY,
        log: str | os.PathLike[str] | None = None,
        systemd_cgroup: bool = False,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.binary = resolve(binary)
        self.name = os.path.basename(binary)
        self.root = Path(root)
        self.reaper = reaper
        self.log = Path(log) if log is not None else None
        self.systemd_cgroup = systemd_cgroup
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.env = env

    # -- plumbing -----------------------------------------------------------------------

    def _argv(self, log: Path | None, *args: str) -> list[str]:
        argv = [self.binary, "--root", str(self.root)]
        if log is not None:
            argv += ["--log", str(log)]
        # Without --log both runtimes log to stderr, in this format too.
        argv += ["--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv + list(args)

    async def _call(self, what: str, *args: str, stdin: bytes | None = None) -> bytes:
        """Run a command whose output is captured; raise its error when it fails."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        done = await command.run(self._argv(None, *args), self.reaper, stdin=stdin,
                                 env=self.env)
        if done.status != 0:
            message = done.stderr.decode(errors="replace") or done.stdout.decode(
                errors="replace")
            raise classify(_last_error_text(message), f"{self.name} {what}")
        return done.stdout

    async def _handing_stdio(
        self, what: str, args: list[str], stdio: Stdio
    ) -> None:
        """Run create/exec: stdio goes to the container, errors come from the JSON log."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        with _log_file(self.log, self.root) as (log, offset):
            done = await command.run(
                self._argv(log, *args), self.reaper,
                stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr, env=self.env,
            )
            if done.status != 0:
                message = _last_log_error(log, offset)
                raise classify(message or f"exit status {done.status}",
                               f"{self.name} {what}", lookup=False)

    # -- OCIRuntime ------------------------------------------------------------------------

    async def create(
        self,
        id: str,
        bundle: Path,
        *,
        stdio: Stdio,
        console_socket: str | None = None,
        pid_file: Path | None = None,
    ) -> int:
        bundle = Path(bundle).absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        with _pid_path(pid_file, self.root, id) as pid_path:
            args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_path)]
            if console_socket:
                args += ["--console-socket", console_socket]
            if self.no_pivot:
                args.append("--no-pivot")
            if self.no_new_keyring:
                args.append("--no-new-keyring")
            await self._handing_stdio("create", [*args, id], stdio)
            return _read_pid(pid_path)

    async def start(self, id: str) -> None:
        await self._call("start", "start", id)

    async def state(self, id: str) -> State:
        raw = json.loads(await self._call("state", "state", id))
        return State(
            id=raw.get("id", id),
            pid=int(raw.get("pid") or 0),
            status=raw.get("status") or "stopped",
            bundle=raw.get("bundle", ""),
            created=_parse_time(raw.get("created", "")),
            annotations=dict(raw.get("annotations") or {}),
        )

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(int(signal))]
        await self._call("kill", *args)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._call("delete", "delete", *(["--force"] if force else []), id)

    async def exec(
        self,
        id: str,
        process: dict,
        *,
        stdio: Stdio,
        console_socket: str | None = None,
        pid_file: Path | None = None,
    ) -> int:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        fd, spec_path = tempfile.mkstemp(prefix=f".{id}-process-", suffix=".json",
                                         dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(process, f)
            with _pid_path(pid_file, self.root, id) as pid_path:
                args = ["exec", "--process", spec_path, "--detach", "--pid-file",
                        str(pid_path)]
                if console_socket:
                    args += ["--console-socket", console_socket]
                await self._handing_stdio("exec", [*args, id], stdio)
                return _read_pid(pid_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spec_path)

    async def pause(self, id: str) -> None:
        await self._call("pause", "pause", id)

    async def resume(self, id: str) -> None:
        await self._call("resume", "resume", id)

    async def ps(self, id: str) -> list[int]:
        out = await self._call("ps", "ps", "--format", "json", id)
        pids = json.loads(out or b"null")
        return [int(p) for p in pids or []]

    async def update(self, id: str, resources: dict) -> None:
        await self._call("update", "update", "--resources", "-", id,
                         stdin=json.dumps(resources).encode())

    async def stats(self, id: str) -> dict:
        out = await self._call("events", "events", "--stats", id)
        line = next((ln for ln in out.splitlines() if ln.strip()), b"{}")
        return from_events(json.loads(line))


def _last_error_text(output: str) -> str:
    """The message of the last error a runtime printed (plain text or JSON lines)."""
    message = ""
    for line in output.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            message = line
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message.removeprefix("runc: ").removeprefix("crun: ")


def _last_log_error(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return _last_error_text(text)


@contextlib.contextmanager
def _log_file(log: Path | None, root: Path):
    """The JSON log to pass and where this call's lines start in it."""
    if log is not None:
        try:
            offset = log.stat().st_size
        except FileNotFoundError:
            offset = 0
        yield log, offset
        return
    fd, path = tempfile.mkstemp(prefix=".log-", suffix=".json", dir=root)
    os.close(fd)
    try:
        yield Path(path), 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _pid_path(pid_file: Path | None, root: Path, id: str):
    if pid_file is not None:
        yield Path(pid_file).absolute()
        return
    fd, path = tempfile.mkstemp(prefix=f".{id}-", suffix=".pid", dir=root)
    os.close(fd)
    os.unlink(path)  # runc refuses nothing, but crun wants to create it itself
    try:
        yield Path(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _read_pid(path: Path) -> int:
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise errdefs.Internal(f"runtime wrote no pid file at {path}", raw=True) from None
    try:
        return int(text)
    except ValueError:
        raise errdefs.Internal(f"bad pid file {path}: {text!r}", raw=True) from None



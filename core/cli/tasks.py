"""`berth tasks start|ls|ps|exec|kill|pause|resume|metrics|rm|attach` (ctr's tasks), over
:mod:`berth.core.client.tasks`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import UTC, datetime
from typing import Any

from grpclib import GRPCError

from berth.core import errdefs
from berth.core.cli import app, errors
from berth.core.cli.output import emit
from berth.core.client import cio, connection, tasks as client_tasks

# --- commands ---------------------------------------------------------------------------

async def start(args: argparse.Namespace, s: connection.Session) -> int:
    container = await client_tasks.get_container(s, args.container)
    spec = client_tasks.container_spec(container)
    tty = bool((spec.get("process") or {}).get("terminal"))
    fifos = cio.new_fifo_set(args.fifo_dir, container.id, terminal=tty)
    created = False

    async def create() -> None:
        nonlocal created
        pid = await client_tasks.create_task(s, container, fifos)
        created = True
        if args.pid_file:
            write_pid_file(args.pid_file, pid)

    try:
        code = await client_tasks.run_attached(s, container.id, fifos, create=create,
                                               detach=args.detach)
    except BaseException:
        if not created:
            fifos.close()
        elif not args.detach:
            with contextlib.suppress(Exception):
                await client_tasks.delete_task(s, container.id, fifos=fifos)
        raise
    if code is None:
        return 0
    await client_tasks.delete_task(s, container.id, fifos=fifos)
    return code


def write_pid_file(path: str, pid: int) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ListTasksRequest

    resp = await client_tasks.tasks_stub(s).list(ListTasksRequest())
    if args.quiet:
        for t in resp.tasks:
            print(t.id)
        return 0
    from berth.core.api.containerd.v1.types import Status

    def name(st: Any) -> str:
        try:
            return str(Status(st))
        except ValueError:
            return str(st)

    emit(["TASK", "PID", "STATUS"], [(t.id, t.pid, name(t.status)) for t in resp.tasks],
         fmt=args.format, records=[{"id": t.id, "pid": t.pid, "status": name(t.status)}
                                   for t in resp.tasks])
    return 0


def _process_info(info: Any) -> str:
    if info is None or not info.type_url:
        return "-"
    if info.type_url.rsplit("/", 1)[-1] == "containerd.runc.v1.ProcessDetails":
        from berth.core.api.containerd.runc.v1 import ProcessDetails

        return f"&ProcessDetails{{ExecID:{ProcessDetails().parse(info.value).exec_id},}}"
    return f"{info.type_url} ({len(info.value)} bytes)"


async def ps(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ListPidsRequest

    await client_tasks.get_container(s, args.container)
    resp = await client_tasks.tasks_stub(s).list_pids(ListPidsRequest(container_id=args.container))
    emit(["PID", "INFO"], [(p.pid, _process_info(p.info)) for p in resp.processes],
         fmt=args.format)
    return 0


async def exec_(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import DeleteProcessRequest, ExecProcessRequest
    from berth.core.oci import default_spec

    if not args.exec_id:
        raise app.CommandError("exec id must not be empty: invalid argument")
    container = await client_tasks.get_container(s, args.container)
    spec = client_tasks.container_spec(container)
    if args.user:
        async with client_tasks.rootfs_users(s, container, spec) as users:
            default_spec.with_user(spec, args.user, users)
    process = dict(spec.get("process") or {})
    process["terminal"] = args.tty
    process["args"] = list(args.args)
    process.pop("consoleSize", None)
    if args.tty:
        from berth.core.cli.run import terminal_size

        size = terminal_size()
        if size:
            process["consoleSize"] = {"height": size[1], "width": size[0]}
    if args.cwd:
        process["cwd"] = args.cwd
    fifos = cio.new_fifo_set(args.fifo_dir, args.exec_id, terminal=args.tty)
    created = False

    async def create() -> None:
        nonlocal created
        await client_tasks.tasks_stub(s).exec(ExecProcessRequest(
            container_id=container.id, exec_id=args.exec_id, stdin=fifos.stdin,
            stdout=fifos.stdout, stderr=fifos.stderr, terminal=fifos.terminal,
            spec=default_spec.process_any(process)))
        created = True

    try:
        code = await client_tasks.run_attached(s, container.id, fifos, exec_id=args.exec_id,
                                  create=create, detach=args.detach)
    finally:
        if not args.detach:
            if created:
                with contextlib.suppress(GRPCError):
                    await client_tasks.tasks_stub(s).delete_process(DeleteProcessRequest(
                        container_id=container.id, exec_id=args.exec_id))
            fifos.close()
        elif not created:
            fifos.close()
    return code or 0


async def kill(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import KillRequest

    if args.all and args.exec_id:
        raise app.CommandError("specify an exec-id or all; not both")
    container = await client_tasks.get_container(s, args.container)
    text = args.signal or container.labels.get(client_tasks.STOP_SIGNAL_LABEL) or "SIGTERM"
    sig = client_tasks.parse_signal(text)
    await client_tasks.tasks_stub(s).kill(KillRequest(
        container_id=container.id, exec_id=args.exec_id, signal=sig, all=args.all))
    return 0


async def pause(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import PauseTaskRequest

    await client_tasks.get_container(s, args.container)
    await client_tasks.tasks_stub(s).pause(PauseTaskRequest(container_id=args.container))
    return 0


async def resume(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ResumeTaskRequest

    await client_tasks.get_container(s, args.container)
    await client_tasks.tasks_stub(s).resume(ResumeTaskRequest(container_id=args.container))
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import DeleteProcessRequest, GetRequest

    if args.exec_id:
        cid = args.containers[0]
        await client_tasks.get_container(s, cid)
        t = client_tasks.tasks_stub(s)
        process = (await t.get(GetRequest(container_id=cid, exec_id=args.exec_id))).process
        if args.force:
            await client_tasks.kill_and_wait(s, cid, args.exec_id)
        resp = await t.delete_process(DeleteProcessRequest(container_id=cid,
                                                           exec_id=args.exec_id))
        cio.loaded_fifo_set(process.stdin, process.stdout, process.stderr).close()
        return int(resp.exit_status)
    failed = False
    for cid in args.containers:
        try:
            await client_tasks.get_container(s, cid)
            resp = await client_tasks.delete_task(s, cid, force=args.force)
        except (GRPCError, errdefs.BerthError, app.CommandError) as e:
            failed = True
            print(f"berth: unable to delete {cid}: {errors.message(e)}", file=sys.stderr)
            continue
        if resp.exit_status:
            print(f"berth: task {cid} exit with non-zero exit code {resp.exit_status}",
                  file=sys.stderr)
    return 1 if failed else 0


async def attach(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import GetRequest

    container = await client_tasks.get_container(s, args.container)
    spec = client_tasks.container_spec(container)
    tty = bool((spec.get("process") or {}).get("terminal"))
    process = (await client_tasks.tasks_stub(s).get(GetRequest(container_id=container.id))).process
    fifos = cio.loaded_fifo_set(process.stdin, process.stdout, process.stderr, tty)
    code = await client_tasks.run_attached(s, container.id, fifos, create=None, start=False)
    await client_tasks.delete_task(s, container.id, fifos=fifos)
    return code or 0


# --- metrics ----------------------------------------------------------------------------

def go_time(t: datetime) -> str:
    """time.Time's String() in UTC, to microseconds (a zero fraction left out)."""
    t = t.astimezone(UTC)
    frac = f".{t.microsecond:06d}" if t.microsecond else ""
    return f"{t.year:04d}-{t:%m-%d %H:%M:%S}{frac} +0000 UTC"


async def metrics(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import MetricsRequest

    container = await client_tasks.get_container(s, args.container)
    resp = await client_tasks.tasks_stub(s).metrics(MetricsRequest(filters=[f"id=={container.id}"]))
    if not resp.metrics:
        raise app.CommandError(f"no metrics received for {container.id}")
    metric = resp.metrics[0]
    data = metric.data
    type_url, value = (data.type_url, bytes(data.value)) if data else ("", b"")
    rows = client_tasks.metrics_rows(type_url, value)
    if args.format == "json":
        doc: dict[str, Any] = {"id": metric.id, "timestamp": metric.timestamp.isoformat(),
                               "type_url": type_url, "size": len(value)}
        if rows is not None:
            doc["metrics"] = dict(rows)
        print(json.dumps(doc, indent=2))
        return 0
    emit(["ID", "TIMESTAMP"], [(metric.id, go_time(metric.timestamp))], fmt="plain")
    print()
    if rows is None:
        emit(["TYPE", "SIZE"], [(type_url, len(value))], fmt="plain")
    else:
        emit(["METRIC", "VALUE"], rows, fmt="plain")
    return 0


# --- arguments --------------------------------------------------------------------------

def fifo_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fifo-dir", default=None,
                   help=f"directory for the IO FIFOs (default {cio.DEFAULT_FIFO_DIR})")


def register(sub: Any) -> None:
    p = app.group(sub, "tasks", example="berth tasks ls",
                  aliases=["task", "t"], help="manage tasks")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True

    c = app.add(g, "attach", attach, example="berth tasks attach web",
                help="attach to the IO of a running container")
    c.add_argument("container")

    c = app.add(g, "delete", rm, example="berth tasks rm -f web", help="delete one or more tasks",
                aliases=["del", "remove", "rm"])
    c.add_argument("--force", "-f", action="store_true", help="force delete task process")
    c.add_argument("--exec-id", default="", help="process ID to delete")
    c.add_argument("containers", nargs="+", metavar="CONTAINER")

    c = app.add(g, "exec", exec_, example="berth tasks exec --exec-id sh1 -t web sh",
                help="execute additional processes in a container")
    c.add_argument("--cwd", default="", help="working directory of the new process")
    c.add_argument("--tty", "-t", action="store_true", help="allocate a TTY")
    c.add_argument("--detach", "-d", action="store_true",
                   help="detach from the process after it has started")
    c.add_argument("--exec-id", required=True, help="exec specific id for the process")
    c.add_argument("--user", default="", help="user id or name")
    fifo_dir_flag(c)
    c.add_argument("container")
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")

    c = app.add(g, "list", ls, example="berth tasks ls", help="list tasks", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true", help="print only the task id")

    c = app.add(g, "kill", kill, example="berth tasks kill -s SIGKILL web",
                help="signal a container (default: SIGTERM)")
    c.add_argument("--signal", "-s", default="", help="signal to send to the container")
    c.add_argument("--exec-id", default="", help="process ID to kill")
    c.add_argument("--all", "-a", action="store_true",
                   help="send signal to all processes inside the container")
    c.add_argument("container")

    c = app.add(g, "metrics", metrics, example="berth tasks metrics web",
                help="get a single data point of metrics for a task",
                aliases=["metric"])
    c.add_argument("container")

    c = app.add(g, "pause", pause, example="berth tasks pause web",
                help="pause an existing container")
    c.add_argument("container")

    c = app.add(g, "ps", ps, example="berth tasks ps web", help="list processes for container")
    c.add_argument("container")

    c = app.add(g, "resume", resume, example="berth tasks resume web",
                help="resume a paused container")
    c.add_argument("container")

    c = app.add(g, "start", start, example="berth tasks start -d web",
                help="start a container that has been created")
    c.add_argument("--detach", "-d", action="store_true",
                   help="detach from the task after it has started execution")
    c.add_argument("--pid-file", default="", help="file path to write the task's pid")
    fifo_dir_flag(c)
    c.add_argument("container")

"""cgroups v1 and v2 for containers: paths, creation, resources, freezer, stats, removal.

The host layout is read from /proc/self/mountinfo. With v2 mounted on the cgroup root
(unified mode) a container has one directory. Otherwise (v1 or hybrid) it gets one
directory per mounted hierarchy (controllers, named ones such as name=systemd, and the
v2 ``unified`` hierarchy of a hybrid host) and resources go to the v1 controllers.

cgroupsPath: "/a/b" is taken from each hierarchy's root, "a/b" from the runtime's own
cgroup in that hierarchy, and "slice:prefix:name" is expanded the way systemd names
scopes (no systemd is asked: the directories are made directly).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from berth.core import errdefs
from berth.plugins.runtimes.inprocess.devices import DEFAULT_ALLOW

CGROUP_ROOT = "/sys/fs/cgroup"
_V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
_UNLIMITED_V1 = 9223372036854771712
V1_CONTROLLERS = frozenset({
    "cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls",
    "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc", "debug",
})


@dataclass
class Hierarchy:
    name: str  # directory name under the cgroup root ("memory", "unified"); "" on v2
    mountpoint: str
    root: str  # path inside the hierarchy that is mounted there (mountinfo field 4)
    controllers: list[str]
    v2: bool


def parse_mountinfo(text: str, cgroup_root: str = CGROUP_ROOT) -> list[Hierarchy]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        lf = left.split(" ")
        rf = right.split(" ")
        if len(lf) < 5 or len(rf) < 3:
            continue
        fstype, mountpoint = rf[0], lf[4].replace("\\040", " ")
        if fstype not in ("cgroup", "cgroup2"):
            continue
        if not (mountpoint == cgroup_root or mountpoint.startswith(cgroup_root + "/")):
            continue
        if fstype == "cgroup2":
            out.append(Hierarchy(os.path.relpath(mountpoint, cgroup_root).strip("."),
                                 mountpoint, lf[3], [], True))
            continue
        controllers = [opt for opt in rf[2].split(",")
                       if opt in V1_CONTROLLERS or opt.startswith("name=")]
        out.append(Hierarchy(os.path.basename(mountpoint), mountpoint, lf[3], controllers,
                             False))
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """controller (or "name=x", or "" for v2) -> cgroup path, from /proc/<pid>/cgroup."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            out[""] = parts[2]
        for ctrl in parts[1].split(","):
            if ctrl:
                out[ctrl] = parts[2]
    return out


def expand_path(cgroups_path: str, id: str) -> str:
    """A cgroupfs path for cgroupsPath; systemd's "slice:prefix:name" becomes
    /<parent slices>/<slice>/<prefix>-<name>.scope."""
    if not cgroups_path:
        return id
    parts = cgroups_path.split(":")
    if len(parts) == 3 and not cgroups_path.startswith("/"):
        slice_, prefix, name = parts
        slice_ = slice_ or "system.slice"
        if not slice_.endswith(".slice"):
            raise errdefs.InvalidArgument(f"cgroupsPath {cgroups_path!r}: bad slice")
        # a-b-c.slice lives in /a.slice/a-b.slice/a-b-c.slice
        stem = slice_[: -len(".slice")]
        chain, acc = [], []
        if stem != "-":
            for piece in stem.split("-"):
                if not piece:
                    raise errdefs.InvalidArgument(f"cgroupsPath {cgroups_path!r}: bad slice")
                acc.append(piece)
                chain.append("-".join(acc) + ".slice")
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return "/" + "/".join([*chain, unit])
    return cgroups_path


def _norm(path: str) -> str:
    return os.path.normpath("/" + path)


@dataclass
class Cgroup:
    """The directories of one container; serialisable into the container's state."""

    dirs: dict[str, str]  # hierarchy name -> absolute directory
    controllers: dict[str, list[str]] = field(default_factory=dict)
    v2: dict[str, bool] = field(default_factory=dict)
    unified: bool = False  # pure v2 host

    # ---- construction -------------------------------------------------------------
    @classmethod
    def resolve(cls, cgroups_path: str, id: str, *, cgroup_root: str = CGROUP_ROOT,
                mountinfo: str | None = None, proc_cgroup: str | None = None) -> Cgroup:
        if mountinfo is None:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        if proc_cgroup is None:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        hierarchies = parse_mountinfo(mountinfo, cgroup_root)
        own = parse_proc_cgroup(proc_cgroup)
        path = expand_path(cgroups_path, id)
        unified = any(h.v2 and h.mountpoint == cgroup_root for h in hierarchies)
        if unified:
            hierarchies = [h for h in hierarchies if h.v2 and h.mountpoint == cgroup_root]
        if not hierarchies:
            raise errdefs.FailedPrecondition(f"no cgroup hierarchy mounted under {cgroup_root}")
        cg = cls({}, unified=unified)
        for h in hierarchies:
            if path.startswith("/"):
                inner = _norm(path)
            else:
                key = "" if h.v2 else h.controllers[0]
                inner = _norm(os.path.join(own.get(key, "/"), path))
            rel = os.path.relpath(inner, h.root) if h.root != "/" else inner.lstrip("/")
            if rel.startswith(".."):
                rel = inner.lstrip("/")
            cg.dirs[h.name] = os.path.join(h.mountpoint, rel)
            cg.controllers[h.name] = list(h.controllers)
            cg.v2[h.name] = h.v2
        if unified:
            try:
                cg.controllers[""] = Path(cgroup_root, "cgroup.controllers").read_text().split()
            except OSError:
                cg.controllers[""] = []
        return cg

    def to_dict(self) -> dict[str, Any]:
        return {"dirs": self.dirs, "controllers": self.controllers, "v2": self.v2,
                "unified": self.unified}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cgroup:
        return cls(dict(d["dirs"]), dict(d.get("controllers") or {}), dict(d.get("v2") or {}),
                   bool(d.get("unified")))

    # ---- helpers ------------------------------------------------------------------
    def dir_for(self, controller: str) -> str | None:
        if self.unified:
            return self.dirs.get("")
        for name, ctrls in self.controllers.items():
            if controller in ctrls:
                return self.dirs[name]
        return None

    def _procs_dir(self) -> str:
        if self.unified:
            return self.dirs[""]
        for ctrl in ("pids", "freezer", "memory", "cpu"):
            d = self.dir_for(ctrl)
            if d:
                return d
        return next(iter(self.dirs.values()))

    def mount_binds(self) -> list[tuple[str, str]]:
        """(name under the container's /sys/fs/cgroup, host dir) for the cgroup mount."""
        return [(name, d) for name, d in sorted(self.dirs.items())]

    # ---- lifecycle ----------------------------------------------------------------
    def create(self) -> None:
        for name, d in self.dirs.items():
            if not self.v2.get(name) and "cpuset" in self.controllers.get(name, []):
                self._mkdir_cpuset(d)
            else:
                os.makedirs(d, exist_ok=True)
        if self.unified:
            self._enable_controllers()

    @staticmethod
    def _mkdir_cpuset(d: str) -> None:
        # A new v1 cpuset has no cpus/mems and refuses tasks until given its parent's.
        missing = []
        p = d
        while not os.path.exists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for p in reversed(missing):
            try:
                os.mkdir(p)
            except FileExistsError:
                pass
            parent = os.path.dirname(p)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not _read(p, f).strip():
                    _write(p, f, _read(parent, f).strip())

    def _enable_controllers(self) -> None:
        d = self.dirs[""]
        root = d
        while os.path.exists(os.path.join(os.path.dirname(root), "cgroup.controllers")) and \
                os.path.dirname(root) != root:
            root = os.path.dirname(root)
        rel = os.path.relpath(d, root)
        current = root
        for part in [] if rel == "." else rel.split("/"):
            available = _read(current, "cgroup.controllers").split()
            wanted = [c for c in _V2_CONTROLLERS if c in available]
            if wanted:
                try:
                    _write(current, "cgroup.subtree_control", " ".join("+" + c for c in wanted))
                except errdefs.BerthError:
                    pass  # e.g. the root with processes in it; what is enabled stays
            current = os.path.join(current, part)

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            _write(d, "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        try:
            text = _read(self._procs_dir(), "cgroup.procs")
        except errdefs.NotFound:
            return []
        return sorted(int(x) for x in text.split())

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs.values())

    async def destroy(self, *, attempts: int = 50) -> None:
        """Remove the container's directories (they must have no processes left)."""
        for d in self.dirs.values():
            for i in range(attempts):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or i == attempts - 1:
                        raise errdefs.FailedPrecondition(f"removing cgroup {d}: {e}") from None
                    await trio.sleep(0.01 * (i + 1))

    # ---- freezer ------------------------------------------------------------------
    def _freezer(self) -> str:
        d = self.dirs.get("") if self.unified else self.dir_for("freezer")
        if d is None:
            raise errdefs.NotImplemented_("freezer cgroup is not mounted")
        return d

    def frozen(self) -> bool:
        try:
            d = self._freezer()
            if self.unified:
                return _read(d, "cgroup.freeze").strip() == "1"
            return _read(d, "freezer.state").strip() == "FROZEN"
        except (errdefs.NotFound, errdefs.NotImplemented_):
            return False

    async def freeze(self) -> None:
        await self._set_frozen(True)

    async def thaw(self) -> None:
        await self._set_frozen(False)

    async def _set_frozen(self, frozen: bool) -> None:
        d = self._freezer()
        for i in range(1000):
            if self.unified:
                _write(d, "cgroup.freeze", "1" if frozen else "0")
                events = _kv(_read(d, "cgroup.events"))
                if events.get("frozen", 0) == (1 if frozen else 0):
                    return
            else:
                want = "FROZEN" if frozen else "THAWED"
                _write(d, "freezer.state", want)
                if _read(d, "freezer.state").strip() == want:
                    return
            await trio.sleep(min(0.001 * (i + 1), 0.05))
        raise errdefs.Unavailable(f"cgroup {d} did not {'freeze' if frozen else 'thaw'}")

    # ---- resources ----------------------------------------------------------------
    def apply(self, resources: dict[str, Any], *, devices: list[Any] | None = None) -> None:
        """Write OCI ``linux.resources``; ``devices`` are the spec's linux.devices, which
        are allowed in the device cgroup like the default nodes."""
        if not resources and not devices:
            return
        if self.unified:
            self._apply_v2(resources or {})
        else:
            self._apply_v1(resources or {}, devices or [])

    def _apply_v1(self, r: dict[str, Any], devices: list[Any]) -> None:
        mem = r.get("memory") or {}
        d = self.dir_for("memory")
        if d and mem:
            limit, swap = mem.get("limit"), mem.get("swap")
            has_memsw = os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))
            if limit is not None and swap is not None and has_memsw:
                current = int(_read(d, "memory.limit_in_bytes"))
                memsw = "-1" if swap == -1 else str(swap)
                # memsw must stay >= the memory limit at every step.
                if swap == -1 or current < swap:
                    _write(d, "memory.memsw.limit_in_bytes", memsw)
                    _write(d, "memory.limit_in_bytes", str(limit))
                else:
                    _write(d, "memory.limit_in_bytes", str(limit))
                    _write(d, "memory.memsw.limit_in_bytes", memsw)
            elif limit is not None:
                _write(d, "memory.limit_in_bytes", str(limit))
            elif swap is not None and has_memsw:
                _write(d, "memory.memsw.limit_in_bytes", str(swap))
            if mem.get("reservation") is not None:
                _write(d, "memory.soft_limit_in_bytes", str(mem["reservation"]))
            if mem.get("swappiness") is not None and 0 <= mem["swappiness"] <= 100:
                _write(d, "memory.swappiness", str(mem["swappiness"]))
            if mem.get("disableOOMKiller"):
                _write(d, "memory.oom_control", "1")
        cpu = r.get("cpu") or {}
        d = self.dir_for("cpu")
        if d and cpu:
            if cpu.get("shares"):
                _write(d, "cpu.shares", str(cpu["shares"]))
            if cpu.get("period"):
                _write(d, "cpu.cfs_period_us", str(cpu["period"]))
            if cpu.get("quota") not in (None, 0):
                _write(d, "cpu.cfs_quota_us", str(cpu["quota"]))
            if cpu.get("burst") is not None:
                _write(d, "cpu.cfs_burst_us", str(cpu["burst"]))
            if cpu.get("realtimePeriod"):
                _write(d, "cpu.rt_period_us", str(cpu["realtimePeriod"]))
            if cpu.get("realtimeRuntime"):
                _write(d, "cpu.rt_runtime_us", str(cpu["realtimeRuntime"]))
            if cpu.get("idle") is not None and os.path.exists(os.path.join(d, "cpu.idle")):
                _write(d, "cpu.idle", str(cpu["idle"]))
        d = self.dir_for("cpuset")
        if d and (cpu.get("cpus") or cpu.get("mems")):
            if cpu.get("cpus"):
                _write(d, "cpuset.cpus", cpu["cpus"])
            if cpu.get("mems"):
                _write(d, "cpuset.mems", cpu["mems"])
        pids = r.get("pids") or {}
        d = self.dir_for("pids")
        if d and "limit" in pids:
            _write(d, "pids.max", str(pids["limit"]) if pids["limit"] > 0 else "max")
        blkio = r.get("blockIO") or {}
        d = self.dir_for("blkio")
        if d and blkio:
            if blkio.get("weight") and os.path.exists(os.path.join(d, "blkio.weight")):
                _write(d, "blkio.weight", str(blkio["weight"]))
            for key, f in (("throttleReadBpsDevice", "blkio.throttle.read_bps_device"),
                           ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device"),
                           ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device"),
                           ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device")):
                for dev in blkio.get(key) or []:
                    _write(d, f, f"{dev['major']}:{dev['minor']} {dev['rate']}")
        d = self.dir_for("hugetlb")
        for h in r.get("hugepageLimits") or []:
            if d:
                _write(d, f"hugetlb.{h['pageSize']}.limit_in_bytes", str(h["limit"]))
        net = r.get("network") or {}
        d = self.dir_for("net_cls")
        if d and net.get("classID") is not None:
            _write(d, "net_cls.classid", str(net["classID"]))
        d = self.dir_for("net_prio")
        if d:
            for p in net.get("priorities") or []:
                _write(d, "net_prio.ifpriomap", f"{p['name']} {p['priority']}")
        d = self.dir_for("devices")
        if d and ("devices" in r or devices):
            self._apply_devices_v1(d, r.get("devices") or [], devices)

    @staticmethod
    def _apply_devices_v1(d: str, rules: list[dict[str, Any]], devices: list[Any]) -> None:
        lines: list[tuple[bool, str]] = []
        for rule in rules:
            t = rule.get("type") or "a"
            major, minor = rule.get("major"), rule.get("minor")
            access = rule.get("access") or "rwm"
            if t == "a":
                entry = "a"
            else:
                entry = (f"{t} {'*' if major in (None, -1) else major}:"
                         f"{'*' if minor in (None, -1) else minor} {access}")
            lines.append((bool(rule.get("allow")), entry))
        for t, major, minor, access in DEFAULT_ALLOW:
            lines.append((True, f"{t} {'*' if major == -1 else major}:"
                                f"{'*' if minor == -1 else minor} {access}"))
        for dev in devices:
            t = "c" if dev.type == "u" else dev.type
            if t in ("c", "b"):
                lines.append((True, f"{t} {dev.major}:{dev.minor} rwm"))
        for allow, entry in lines:
            _write(d, "devices.allow" if allow else "devices.deny", entry)

    def _apply_v2(self, r: dict[str, Any]) -> None:
        d = self.dirs[""]
        mem = r.get("memory") or {}
        if mem:
            limit, swap = mem.get("limit"), mem.get("swap")
            if limit is not None:
                _write(d, "memory.max", "max" if limit == -1 else str(limit))
            if swap is not None and os.path.exists(os.path.join(d, "memory.swap.max")):
                if swap == -1:
                    value = "max"
                elif limit not in (None, -1):
                    value = str(max(swap - limit, 0))  # OCI swap is memory+swap
                else:
                    value = str(swap)
                _write(d, "memory.swap.max", value)
            if mem.get("reservation") is not None:
                _write(d, "memory.low", str(mem["reservation"]))
            if mem.get("disableOOMKiller"):
                raise errdefs.InvalidArgument("disableOOMKiller is not supported on cgroup v2")
        cpu = r.get("cpu") or {}
        if cpu.get("shares"):
            _write(d, "cpu.weight", str(1 + ((cpu["shares"] - 2) * 9999) // 262142))
        if cpu.get("quota") not in (None, 0) or cpu.get("period"):
            quota = cpu.get("quota")
            period = cpu.get("period") or 100000
            _write(d, "cpu.max", f"{'max' if quota in (None, -1, 0) else quota} {period}")
        if cpu.get("cpus"):
            _write(d, "cpuset.cpus", cpu["cpus"])
        if cpu.get("mems"):
            _write(d, "cpuset.mems", cpu["mems"])
        pids = r.get("pids") or {}
        if "limit" in pids:
            _write(d, "pids.max", str(pids["limit"]) if pids["limit"] > 0 else "max")
        blkio = r.get("blockIO") or {}
        if blkio.get("weight") and os.path.exists(os.path.join(d, "io.weight")):
            _write(d, "io.weight", str(1 + (blkio["weight"] - 10) * 9999 // 990))
        for key, value in (r.get("unified") or {}).items():
            if "/" in key or key.startswith("."):
                raise errdefs.InvalidArgument(f"unified resource {key!r}")
            _write(d, key, str(value))
        # Device rules need an eBPF program on v2; berth does not attach one.

    # ---- statistics ---------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self._stats_v2() if self.unified else self._stats_v1()

    def _stats_v1(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        d = self.dir_for("memory")
        if d and os.path.isdir(d):
            oom = _kv(_read_opt(d, "memory.oom_control"))
            out["memory"] = {
                "usage": _int_opt(d, "memory.usage_in_bytes"),
                "limit": _int_opt(d, "memory.limit_in_bytes"),
                "max_usage": _int_opt(d, "memory.max_usage_in_bytes"),
                "failcnt": _int_opt(d, "memory.failcnt"),
                "oom": oom.get("oom_kill", 0),
                "oom_kill": oom.get("oom_kill", 0),
                "swap_usage": _int_opt(d, "memory.memsw.usage_in_bytes"),
                "swap_limit": _int_opt(d, "memory.memsw.limit_in_bytes"),
                "stat": _kv(_read_opt(d, "memory.stat")),
            }
        cpu: dict[str, Any] = {}
        d = self.dir_for("cpuacct")
        if d and os.path.isdir(d):
            cpu["usage_total"] = _int_opt(d, "cpuacct.usage")
            cpu["usage_percpu"] = [int(v) for v in _read_opt(d, "cpuacct.usage_percpu").split()
                                   if v.isdigit()]
            ticks = _kv(_read_opt(d, "cpuacct.stat"))
            hz = os.sysconf("SC_CLK_TCK") or 100
            cpu["usage_user"] = ticks.get("user", 0) * 1_000_000_000 // hz
            cpu["usage_kernel"] = ticks.get("system", 0) * 1_000_000_000 // hz
        d = self.dir_for("cpu")
        if d and os.path.isdir(d):
            st = _kv(_read_opt(d, "cpu.stat"))
            cpu["nr_periods"] = st.get("nr_periods", 0)
            cpu["throttled_periods"] = st.get("nr_throttled", 0)
            cpu["throttled_time"] = st.get("throttled_time", 0)
        if cpu:
            out["cpu"] = cpu
        d = self.dir_for("pids")
        if d and os.path.isdir(d):
            limit = _read_opt(d, "pids.max").strip()
            out["pids"] = {"current": _int_opt(d, "pids.current"),
                           "limit": 0 if limit in ("max", "") else int(limit)}
        return out

    def _stats_v2(self) -> dict[str, Any]:
        d = self.dirs[""]
        out: dict[str, Any] = {}
        if not os.path.isdir(d):
            return out
        events = _kv(_read_opt(d, "memory.events"))
        limit = _read_opt(d, "memory.max").strip()
        swap_limit = _read_opt(d, "memory.swap.max").strip()
        out["memory"] = {
            "usage": _int_opt(d, "memory.current"),
            "limit": _UNLIMITED_V1 if limit in ("max", "") else int(limit),
            "max_usage": _int_opt(d, "memory.peak"),
            "failcnt": events.get("max", 0),
            "oom": events.get("oom", 0),
            "oom_kill": events.get("oom_kill", 0),
            "swap_usage": _int_opt(d, "memory.swap.current"),
            "swap_limit": _UNLIMITED_V1 if swap_limit in ("max", "") else int(swap_limit),
            "stat": _kv(_read_opt(d, "memory.stat")),
        }
        st = _kv(_read_opt(d, "cpu.stat"))
        out["cpu"] = {
            "usage_total": st.get("usage_usec", 0) * 1000,
            "usage_user": st.get("user_usec", 0) * 1000,
            "usage_kernel": st.get("system_usec", 0) * 1000,
            "nr_periods": st.get("nr_periods", 0),
            "throttled_periods": st.get("nr_throttled", 0),
            "throttled_time": st.get("throttled_usec", 0) * 1000,
        }
        plimit = _read_opt(d, "pids.max").strip()
        out["pids"] = {"current": _int_opt(d, "pids.current"),
                       "limit": 0 if plimit in ("max", "") else int(plimit)}
        return out


def _read(d: str, name: str) -> str:
    try:
        with open(os.path.join(d, name)) as f:
            return f.read()
    except FileNotFoundError:
        raise errdefs.NotFound(f"cgroup file {os.path.join(d, name)}") from None


def _read_opt(d: str, name: str) -> str:
    try:
        with open(os.path.join(d, name)) as f:
            return f.read()
    except OSError:
        return ""


def _int_opt(d: str, name: str) -> int:
    text = _read_opt(d, name).strip()
    try:
        return int(text)
    except ValueError:
        return 0


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _write(d: str, name: str, value: str) -> None:
    path = os.path.join(d, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errdefs.NotFound(f"cgroup file {path}") from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise errdefs.InvalidArgument(f"writing {value!r} to {path}: {e.strerror}") from None
    finally:
        os.close(fd)

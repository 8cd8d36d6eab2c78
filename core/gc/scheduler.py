"""The garbage collection scheduler, plugin io.containerd.gc.v1.scheduler.

containerd's ``gc/scheduler`` policy, on trio: stores report each committed change
(``mutated``), deletions make a collection due, and a collection runs at the next
scheduled tick, spaced so that collection pauses stay under ``pause_threshold`` of the
time. ``schedule_and_wait`` runs one on demand (image delete and lease delete with
``sync``). The loop is a task in the daemon's nursery.

Configuration (section ``[plugins."io.containerd.gc.v1.scheduler"]``), as containerd's:
``pause_threshold`` (0.02, at most 0.5), ``deletion_threshold`` (0: any deletion makes a
collection due at the next tick), ``mutation_threshold`` (100), ``schedule_delay``
("0ms") and ``startup_delay`` ("100ms").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import trio

from berth.core import errdefs, log
from berth.core.gc.collector import Collector, Stats
from berth.core.gocompat.duration import (  # noqa: F401 - config and exports use them
    format_duration,
    go_duration,
    parse_duration,
)
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import ALL, GC, METADATA, SERVICE

_log = log.get("gc")

DEFAULTS: dict[str, Any] = {
    "pause_threshold": 0.02,
    "deletion_threshold": 0,
    "mutation_threshold": 100,
    "schedule_delay": "0ms",
    "startup_delay": "100ms",
}

# The longest a collection waits for the daemon's plugins to finish initialising.
INIT_WAIT = 30.0

@dataclass
class Config:
    pause_threshold: float = 0.02
    deletion_threshold: int = 0
    mutation_threshold: int = 100
    schedule_delay: float = 0.0
    startup_delay: float = 0.1

    @classmethod
    def from_plugin(cls, data: dict[str, Any]) -> Config:
        merged = {**DEFAULTS, **data}
        try:
            cfg = cls(
                pause_threshold=float(merged["pause_threshold"]),
                deletion_threshold=int(merged["deletion_threshold"]),
                mutation_threshold=int(merged["mutation_threshold"]),
                schedule_delay=parse_duration(merged["schedule_delay"]),
                startup_delay=parse_duration(merged["startup_delay"]),
            )
        except (TypeError, ValueError) as e:
            raise errdefs.InvalidArgument(f"gc scheduler config: {e}", raw=True) from None
        # The same clamps as containerd: at most half the time spent collecting.
        cfg.pause_threshold = min(max(cfg.pause_threshold, 0.0), 0.5)
        cfg.mutation_threshold = max(cfg.mutation_threshold, 0)
        cfg.schedule_delay = max(cfg.schedule_delay, 0.0)
        cfg.startup_delay = max(cfg.startup_delay, 0.0)
        return cfg


class _Waiter:
    def __init__(self) -> None:
        self._done = trio.Event()
        self._stats: Stats | None = None
        self._error: BaseException | None = None

    def finish(self, stats: Stats | None, error: BaseException | None = None) -> None:
        self._stats, self._error = stats, error
        self._done.set()

    async def wait(self) -> Stats:
        await self._done.wait()
        if self._error is not None or self._stats is None:
            # containerd's words; the cause is in the daemon's log.
            raise errdefs.Unknown("gc failed", raw=True)
        return self._stats


class Pending:
    """A collection already requested; await it to wait for its end.

    Callers that cannot await (a plain ``def`` service method) still get the
    collection, just without waiting for it.
    """

    def __init__(self, waiter: _Waiter) -> None:
        self._waiter = waiter

    def __await__(self) -> Generator[Any, None, Stats]:
        return self._waiter.wait().__await__()


class GCScheduler:
    """Decides when to collect; runs the collector; answers waiters."""

    def __init__(self, collector: Collector, config: Config | None = None) -> None:
        self.collector = collector
        self.config = config or Config()
        self._waiters: list[_Waiter] = []
        # What happened since the last collection began (containerd's scheduler counts
        # the same from its event channel). Stores report here directly; the loop is
        # woken only when a report can move the next collection (see _wants_loop), not
        # once per committed change.
        self._mutations = 0
        self._deletions = 0
        self._triggered = False
        self._wake = trio.Event()
        # The loop's view while it sleeps: nothing due (no timer armed), and the time
        # of the next collection it waits for (None: none scheduled yet).
        self._idle = False
        self._next_at: float | None = None
        self.wakeups = 0  # times the loop woke up (tests check that idle means asleep)
        self.collections = 0
        self.last_stats: Stats | None = None
        self._plugins: Any = None

    # --- what stores and services call ------------------------------------------------

    def mutated(self, deletion: bool = False, *, content: bool = False,
                snapshotter: str | None = None) -> None:
        """Report a committed metadata change; ``deletion`` makes a collection due.

        ``content`` / ``snapshotter`` mark that backend for cleanup at the next
        collection (a deleted record may leave its blob or snapshot behind).
        """
        if content:
            self.collector.dirty_content = True
        if snapshotter:
            self.collector.dirty_snapshotters.add(snapshotter)
        self._mutations += 1
        if deletion:
            self._deletions += 1
        if self._wants_loop():
            self._wake.set()

    def trigger(self) -> Pending:
        """Request a collection now (after ``schedule_delay``) without waiting for it."""
        w = _Waiter()
        self._waiters.append(w)
        self._triggered = True
        self._wake.set()
        return Pending(w)

    def _due(self, next_at: float | None) -> bool:
        """containerd's condition for a collection soon (after ``schedule_delay``)."""
        dt, mt = self.config.deletion_threshold, self.config.mutation_threshold
        return (self._triggered or (dt > 0 and self._deletions >= dt)
                or (next_at is None and ((dt == 0 and self._deletions > 0)
                                         or (mt > 0 and self._mutations >= mt))))

    def _is_idle(self, collected: bool) -> bool:
        """Nothing due at the next tick: the loop then sleeps without a timer."""
        mt = self.config.mutation_threshold
        return (not self._triggered and collected and self._deletions == 0
                and (mt == 0 or self._mutations < mt))

    def _wants_loop(self) -> bool:
        """Whether the change just counted can move the next collection."""
        if self._idle:
            return not self._is_idle(True)  # the next tick now has work: arm it
        if not self._due(self._next_at):
            return False
        if self._next_at is None:
            return True
        return self._next_at > trio.current_time() + self.config.schedule_delay

    async def schedule_and_wait(self) -> Stats:
        return await self.trigger()

    # --- wiring -----------------------------------------------------------------------

    def wire(self, plugins: Any) -> None:
        self._plugins = plugins

    async def _wait_for_plugins(self) -> None:
        """Wait until every other plugin has initialised.

        Stores such as containers register their roots at their init, possibly after
        this plugin's; a collection before that would take what only they keep. Plugins
        that require "*" initialise after all others, so one of them being in the set
        means the rest are done (a daemon without any gets a bounded wait).
        """
        if self._plugins is None:
            return
        deadline = trio.current_time() + INIT_WAIT
        while not any(ALL in p.registration.requires
                      for p in getattr(self._plugins, "ordered", ())):
            if trio.current_time() >= deadline:
                _log.warning("plugins still initialising; garbage collection starts anyway")
                return
            await trio.sleep(0.01)

    # --- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        interval = 1.0
        gc_time = 0.0
        last_end: float | None = None     # trio clock
        next_at: float | None = None
        task_status.started()
        await self._wait_for_plugins()
        if cfg.startup_delay > 0:
            next_at = trio.current_time() + cfg.startup_delay
        while True:
            # containerd re-arms its timer every interval even when nothing is due (the
            # tick then skips). Those ticks only matter once something is due, so while
            # nothing is they stay arithmetic (_tick_after) instead of waking this task
            # 20-40 times a second: that was most of an idle berthd's CPU.
            if self._due(next_at):
                soon = trio.current_time() + cfg.schedule_delay
                if next_at is None or next_at > soon:
                    next_at = soon
            idle = self._is_idle(last_end is not None)
            self._idle, self._next_at = idle, next_at
            self._wake = trio.Event()
            with trio.move_on_at(math.inf if next_at is None or idle else next_at) as timer:
                await self._wake.wait()
            self.wakeups += 1
            if not timer.cancelled_caught:
                if idle and next_at is not None:
                    next_at = _tick_after(next_at, interval, trio.current_time())
                continue
            # The timer fired, and it is armed only when something is due. What is
            # reported from here on counts towards the next collection.
            self._idle, self._next_at = False, None
            waiters, self._waiters = self._waiters, []
            counted = (self._triggered, self._deletions, self._mutations)
            self._triggered, self._deletions, self._mutations = False, 0, 0
            try:
                stats = await self.collector.collect()
            except Exception as e:
                _log.error("garbage collection failed", error=str(e))
                # Still due: the counts go back and the next try is a second later.
                self._triggered = self._triggered or counted[0]
                self._deletions += counted[1]
                self._mutations += counted[2]
                now = trio.current_time()
                since = (next_at - last_end) if (next_at is not None and last_end is not None) \
                    else 0.0
                next_at, last_end = now + since + 1.0, now
                for w in waiters:
                    w.finish(None, e)
                continue
            gc_time += stats.elapsed
            self.collections += 1
            self.last_stats = stats
            if cfg.pause_threshold > 0.0:
                avg = gc_time / self.collections
                interval = avg / cfg.pause_threshold - avg
            last_end = trio.current_time()
            next_at = last_end + interval
            # Debug, as containerd's: at info it was a log line per container removal.
            # Its durations are formatted only when the line is written (a ctr run --rm
            # collects two or three times).
            if _log.is_enabled_for(logging.DEBUG):
                _log.debug(
                    "garbage collected", d=format_duration(stats.elapsed),
                    content=stats.content, ingests=stats.ingests, leases=stats.leases,
                    snapshots=stats.snapshots, blobs=stats.blobs,
                    backend_ingests=stats.backend_ingests,
                    content_d=format_duration(stats.content_d),
                    snapshot_d={k: format_duration(v) for k, v in stats.snapshot_d.items()},
                )
            for w in waiters:
                w.finish(stats)


def _tick_after(tick: float, interval: float, now: float) -> float:
    """The first of the ticks ``tick``, ``tick + interval``, ... that is still ahead."""
    if interval <= 0:
        return max(tick, now)
    if tick > now:
        return tick
    return tick + (math.floor((now - tick) / interval) + 1) * interval


# --- plugin -------------------------------------------------------------------------------

def snapshotters_of(plugins: Any) -> dict[str, Any]:
    """The snapshot service's snapshotters, or none when it is not loaded."""
    try:
        svc = plugins.get(SERVICE, "snapshots-service")
    except errdefs.NotFound:
        return {}
    return dict(getattr(svc, "snapshotters", None) or {})


def content_of(plugins: Any) -> Any:
    try:
        return plugins.get(SERVICE, "content-service")
    except errdefs.NotFound:
        return None


def notifier(plugins: Any, *, content: bool = False,
             snapshotter: str | None = None) -> Callable[[bool], None]:
    """A ``mutated(deletion)`` callback for a store that may load before (or without)
    the scheduler: it finds the scheduler when it first can."""
    found: list[GCScheduler] = []

    def notify(deletion: bool) -> None:
        if not found:
            try:
                found.append(plugins.get(GC, "scheduler"))
            except errdefs.NotFound:
                return
        found[0].mutated(deletion, content=content and deletion,
                         snapshotter=snapshotter if deletion else None)

    return notify


async def _init(ctx: InitContext) -> GCScheduler:
    md = ctx.plugins.get(METADATA)
    cfg = Config.from_plugin(ctx.config)
    plugins = ctx.plugins
    collector = Collector(md.db, snapshotters=lambda: snapshotters_of(plugins),
                          content=lambda: content_of(plugins))
    s = GCScheduler(collector, cfg)
    ctx.exports.update({
        "PauseThreshold": f"{cfg.pause_threshold:g}",
        "DeletionThreshold": str(cfg.deletion_threshold),
        "MutationThreshold": str(cfg.mutation_threshold),
        "ScheduleDelay": format_duration(cfg.schedule_delay),
    })
    s.wire(plugins)
    ctx.nursery.start_soon(s.run)
    return s


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GC, id="scheduler", init=_init, requires=(METADATA,),
                         config=dict(DEFAULTS))]

"""berthd primes the cgroup attach lock only for a start that has the field to itself."""

from __future__ import annotations

import math
from pathlib import Path

import trio

from berth.core.runtime import attach_primer
from berth.core.runtime.attach_primer import QUIET, Primer, should_prime


def test_should_prime():
    assert should_prime(10.0, 0, -math.inf, False)
    assert should_prime(10.0, 0, 10.0 - 2 * QUIET, False)
    assert not should_prime(10.0, 0, 10.0 - QUIET / 2, False)  # one just finished
    assert not should_prime(10.0, 1, -math.inf, False)  # another start under way
    assert not should_prime(10.0, 0, -math.inf, True)  # a prime is waiting already


async def test_a_burst_primes_once_and_a_lone_start_again(monkeypatch):
    written = []
    release = trio.Event()

    def prime() -> bool:
        written.append(1)
        trio.from_thread.run(release.wait)
        return True

    monkeypatch.setattr(attach_primer, "prime", prime)
    async with trio.open_nursery() as nursery:
        primer = Primer(nursery)

        async def start(delay: float) -> None:
            with primer.starting():
                await trio.sleep(delay)

        async with trio.open_nursery() as burst:
            for _ in range(5):
                burst.start_soon(start, 0.01)
        assert written == [1]  # the first start only
        release.set()
        await trio.sleep(QUIET * 2)
        await start(0)
        await trio.sleep(QUIET)  # the prime's thread runs
        assert written == [1, 1]
    assert primer.primed == 2


def test_attach_lock_primer_picks_an_existing_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "pids" / "a" / "b").mkdir(parents=True)
    (root / "pids" / "a" / "b" / "cgroup.procs").write_text("")
    (root / "unified" / "x").mkdir(parents=True)
    (root / "unified" / "x" / "cgroup.procs").write_text("")
    text = "9:name=systemd:/gone\n8:pids:/a/b\n0::/x\n"
    assert attach_primer.own_procs_file(text, str(root)) == str(
        root / "pids" / "a" / "b" / "cgroup.procs")
    # v1 hierarchies missing: the v2 line (hybrid layout, under "unified")
    assert attach_primer.own_procs_file("8:pids:/nope\n0::/x\n", str(root)) == str(
        root / "unified" / "x" / "cgroup.procs")
    # combined controllers live in one directory named after all of them
    (root / "cpu,cpuacct" / "s").mkdir(parents=True)
    (root / "cpu,cpuacct" / "s" / "cgroup.procs").write_text("")
    assert attach_primer.own_procs_file("3:cpu,cpuacct:/s\n", str(root)) == str(
        root / "cpu,cpuacct" / "s" / "cgroup.procs")
    assert attach_primer.own_procs_file("garbage\n", str(root)) is None

"""berthd primes the cgroup attach lock only for a start that has the field to itself."""

from __future__ import annotations

import math

import trio

from core.runtime import attach_primer
from core.runtime.attach_primer import QUIET, Primer, should_prime


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

    monkeypatch.setattr(attach_primer.attach_lock, "prime", prime)
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

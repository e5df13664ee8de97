"""The registry of announced in-flight chunks and bounded waits for them (a hand-off's decode side)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvstore.errors import Busy, InvalidInput
from kvstore.events import StoreEvent
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.service.migration.inflight import Inflight, InflightLimits

NS = NamespaceId(b"n" * 32)
OTHER = NamespaceId(b"o" * 32)
KEYS = [ChunkKey(bytes([i]) * 32) for i in range(6)]


def stored(ns: NamespaceId, key: ChunkKey) -> StoreEvent:
    return StoreEvent("stored", "cpu", ns, key)


def test_pending_counts_the_leading_announced_run() -> None:
    reg = Inflight()
    assert reg.announce(NS, KEYS[1:4], ttl_s=10) == 3
    assert reg.pending(NS, KEYS) == 0  # the first key is not announced
    assert reg.pending(NS, KEYS[1:]) == 3
    assert reg.pending(OTHER, KEYS[1:]) == 0  # namespaces never meet
    reg.emit(stored(NS, KEYS[2]))
    assert reg.pending(NS, KEYS[1:]) == 1
    assert reg.announce(NS, KEYS[1:3], ttl_s=10) == 1  # KEYS[1] was still expected
    s = reg.stats()
    assert (s.pending, s.announced, s.arrived) == (3, 4, 1)


def test_announcements_expire_by_themselves() -> None:
    now = [100.0]
    reg = Inflight(clock=lambda: now[0])
    reg.announce(NS, KEYS[:2], ttl_s=5)
    reg.announce(NS, KEYS[2:4], ttl_s=50)
    now[0] += 6
    assert reg.pending(NS, KEYS[:2]) == 0
    assert reg.pending(NS, KEYS[2:]) == 2
    reg.announce(NS, KEYS[2:3], ttl_s=100)  # renewed: the old expiry no longer applies
    now[0] += 50
    assert reg.pending(NS, KEYS[2:]) == 1
    assert reg.stats().expired == 3


def test_bad_input_and_limits() -> None:
    reg = Inflight(InflightLimits(max_keys=4, max_ttl_s=60))
    for ttl in (0, -1, 61, "5", float("nan")):
        with pytest.raises(InvalidInput):
            reg.announce(NS, KEYS[:1], ttl_s=ttl)  # type: ignore[arg-type]
    reg.announce(NS, KEYS[:3], ttl_s=10)
    with pytest.raises(Busy):
        reg.announce(NS, KEYS[3:6], ttl_s=10)
    assert reg.pending(NS, KEYS[3:]) == 0  # nothing of the refused batch was taken
    with pytest.raises(InvalidInput):
        InflightLimits(max_keys=0)
    with pytest.raises(InvalidInput):
        asyncio.run(reg.wait(NS, KEYS, timeout_s=-1))


def test_wait_returns_when_the_run_arrives_from_another_thread() -> None:
    reg = Inflight()
    reg.announce(NS, KEYS[:3], ttl_s=30)

    def deliver() -> None:
        for key in KEYS[:3]:
            time.sleep(0.05)
            reg.emit(stored(NS, key))

    async def main() -> tuple[bool, float]:
        t = threading.Thread(target=deliver)
        start = time.monotonic()
        t.start()
        ok = await reg.wait(NS, KEYS, timeout_s=10)
        t.join()
        return ok, time.monotonic() - start

    ok, took = asyncio.run(main())
    assert ok
    assert 0.1 < took < 5  # woken by the last arrival, not by the timeout
    assert reg.stats().arrived == 3


def test_wait_is_bounded_and_counts_timeouts() -> None:
    reg = Inflight(InflightLimits(max_wait_s=0.3))
    reg.announce(NS, KEYS[:2], ttl_s=30)
    start = time.monotonic()
    assert asyncio.run(reg.wait(NS, KEYS, timeout_s=100)) is False  # capped at max_wait_s
    assert time.monotonic() - start < 3
    assert reg.stats().wait_timeouts == 1
    assert reg.pending(NS, KEYS) == 2  # a timed-out wait takes nothing away


def test_wait_ends_on_withdraw_clear_and_expiry() -> None:
    async def waits_for(reg: Inflight, act: object) -> bool:
        task = asyncio.create_task(reg.wait(NS, KEYS, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not task.done()
        act()  # type: ignore[operator]
        return await asyncio.wait_for(task, 5)

    reg = Inflight()
    reg.announce(NS, KEYS[:2], ttl_s=30)
    assert asyncio.run(waits_for(reg, lambda: reg.withdraw(NS, KEYS[:2])))

    reg.announce(NS, KEYS[:2], ttl_s=30)
    reg.announce(OTHER, KEYS[:2], ttl_s=30)
    assert asyncio.run(waits_for(reg, lambda: reg.emit(StoreEvent("cleared", "cpu", NS))))
    assert reg.pending(OTHER, KEYS) == 2  # another namespace's clear leaves these

    reg.announce(NS, KEYS[:1], ttl_s=0.3)  # expiry wakes the waiter without any event
    start = time.monotonic()
    assert asyncio.run(reg.wait(NS, KEYS, timeout_s=10))
    assert time.monotonic() - start < 3


def test_wait_returns_at_once_without_announcements() -> None:
    reg = Inflight()
    start = time.monotonic()
    assert asyncio.run(reg.wait(NS, KEYS, timeout_s=10))
    assert time.monotonic() - start < 0.5
    assert reg.stats().waits == 0

"""Property-based: random put/lookup/get/release/evict/expire sequences never leak
pins, never overflow a budget, and never return wrong bytes."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import StoreConfig, TieredStore

SPEC = KVSpec(ModelFingerprint("prop"), 1, 1, 8, "uint8")
NS = Namespace("t", SPEC, chunk_tokens=16)
CHUNK = SPEC.chunk_nbytes(16)  # 256 bytes


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def seq(i: int, n: int) -> list[int]:
    return [i * 1000 + j for j in range(n * 16)]


def payload(key: bytes) -> np.ndarray:
    return np.frombuffer((key * 8)[:CHUNK], dtype=np.uint8).copy()


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        policy = "lfu"
        self.tiers = [
            CPUTier(CPUTierConfig(capacity_bytes=6 * CHUNK, alignment=256, policy=policy), "top", clock=self.clock),
            CPUTier(CPUTierConfig(capacity_bytes=10 * CHUNK, alignment=256), "low", clock=self.clock),
        ]
        self.store = TieredStore(
            self.tiers, StoreConfig(lease_ttl_s=3.0, reaper_interval_s=3600), clock=self.clock
        )
        self.store.register_namespace(NS)
        self.leases: list[int] = []

    @rule(i=st.integers(0, 5), n=st.integers(1, 4))
    def put(self, i: int, n: int) -> None:
        toks = seq(i, n)
        keys = prefix_keys(NS, toks)
        self.store.put_prefix(NS, toks, [payload(k) for k in keys])

    @rule(i=st.integers(0, 5), n=st.integers(1, 4), lease=st.booleans())
    def lookup(self, i: int, n: int, lease: bool) -> None:
        r = self.store.lookup(NS, seq(i, n), lease=lease)
        assert r.hit_chunks <= n
        if r.lease is not None:
            self.leases.append(r.lease)

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), all_keys=st.booleans())
    def get_with_lease(self, data: st.DataObject, all_keys: bool) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        for i in range(6):
            for key in prefix_keys(NS, seq(i, 4)):
                if self.store.leases.tier_of(lease, key) is not None:
                    out = np.zeros(CHUNK, dtype=np.uint8)
                    n = self.store.get(NS, key, out, lease)
                    assert n == CHUNK and np.array_equal(out, payload(key))  # a pinned chunk is always there
                    if not all_keys:
                        return

    @rule(i=st.integers(0, 5), j=st.integers(0, 3))
    def get(self, i: int, j: int) -> None:
        key = prefix_keys(NS, seq(i, 4))[j]
        out = np.zeros(CHUNK, dtype=np.uint8)
        n = self.store.get(NS, key, out)
        if n is not None:
            assert np.array_equal(out, payload(key))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.store.release(data.draw(st.sampled_from(self.leases)))

    @rule(dt=st.floats(0.1, 4.0))
    def advance(self, dt: float) -> None:
        self.clock.t += dt
        self.store.leases.expire()

    @rule(i=st.integers(0, 5), j=st.integers(0, 3))
    def delete(self, i: int, j: int) -> None:
        self.store.delete(NS, prefix_keys(NS, seq(i, 4))[j])

    @invariant()
    def budgets_hold_and_pins_match_leases(self) -> None:
        self.store.flush()
        for tier in self.tiers:
            s = tier.stats()
            assert 0 <= s.used_bytes <= s.capacity_bytes
        held: dict[str, int] = {"top": 0, "low": 0}
        for lease in self.store.leases.live():
            for tier in lease.pins.values():
                held[tier.name] += 1
        assert self.tiers[0].pinned_count() == held["top"]
        assert self.tiers[1].pinned_count() == held["low"]

    def teardown(self) -> None:
        self.store.close()  # releases every lease
        assert all(t.pinned_count() == 0 for t in self.tiers)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

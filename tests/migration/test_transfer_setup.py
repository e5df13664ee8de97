"""A push's opening over a delayed link: REGISTER, HAVE and ANNOUNCE pipelined behind HELLO, connections pooled.

A real daemon behind the benchmark's delaying relay (50 ms of round trip);
the pushing side is an in-process store running the transfer engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.benchmarks.relay import DelayRelay
from kvstore.builder import TiersConfig, build_store
from kvstore.service.protocol import Unauthorized
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration.link import LinkEstimator
from kvstore.service.migration.progress import TransferProgress
from kvstore.service.migration.transfer import TransferRequest, run
from kvstore.service.migration.transfer_peers import PeerKey, PeerPool
from kvstore.spec import KVSpec, ModelFingerprint
from tests.migration.transfer_helpers import float_chunks, read_chunks
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")

NS = Namespace("tenant-a", KVSpec(ModelFingerprint("setup-test"), 4, 4, 64, "float16"), chunk_tokens=16)
RTT = 0.05


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("setup") / "b", tokens=TOKENS, name="b").start()
    yield d
    d.stop()


async def _push(store, url: str, keys: list[ChunkKey], pool: PeerPool, token: str = TOKEN_A,  # type: ignore[no-untyped-def]
                ) -> tuple[TransferProgress, float]:
    req = TransferRequest(url, NS, tuple(keys), token=token)
    progress = TransferProgress("t", "push", url, NS.id.hex(), NS.tenant, "raw", len(keys), None)
    t0 = time.monotonic()
    await run(store, req, progress, LinkEstimator(), pool)
    return progress, time.monotonic() - t0


def test_opening_is_one_round_trip_and_the_next_push_reuses_the_connection(peer: DaemonProc,
                                                                           tmp_path: Path) -> None:
    keys, chunks = float_chunks(NS, 6, seed=31)
    store = build_store(TiersConfig(cpu_bytes=8 << 20, data_dir=None))
    store.register_namespace(NS)
    for key, chunk in zip(keys, chunks):
        assert store.put(NS, key, chunk.view(np.uint8))

    async def scenario() -> dict[str, object]:
        relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", peer.port), rtt_s=RTT)
        await relay.start()
        url = f"kvstore://127.0.0.1:{relay.port}"
        pool = PeerPool()
        try:
            moved, _ = await _push(store, url, keys[:3], pool)  # a new connection: HELLO, REGISTER, HAVE, XPUTs
            key = PeerKey(url, TOKEN_A)
            assert pool.idle_count(key) == 1
            first = await pool.take(key)
            conn = first.conn
            assert NS.id in first.registered and first.rtt_s < 2 * RTT
            await pool.give_back(first)
            _, reused_s = await _push(store, url, keys[:3], pool)  # the peer holds them: HAVE only
            again = await pool.take(key)
            assert again.reused and again.conn is conn  # the same connection, still registered
            await pool.give_back(again)
            rest, _ = await _push(store, url, keys[3:], pool)  # chunks move on the reused connection too
            fresh_pool = PeerPool()
            _, fresh_s = await _push(store, url, keys, fresh_pool)  # new connection, the peer holds all
            await fresh_pool.close()
            with pytest.raises(Unauthorized):
                await _push(store, url, keys, pool, token="not-a-token")
            assert pool.idle_count(PeerKey(url, "not-a-token")) == 0  # a failed session is closed, not pooled
            return {"moved": moved, "rest": rest, "reused_s": reused_s, "fresh_s": fresh_s, "pool": pool}
        finally:
            await pool.close()
            await relay.close()

    try:
        out = asyncio.run(scenario())
    finally:
        store.close()
    assert out["moved"].chunks_done == 3 and out["rest"].chunks_done == 3  # type: ignore[attr-defined]
    assert read_chunks(peer.port, TOKEN_A, NS, keys, NS.chunk_nbytes) == [c.tobytes() for c in chunks]
    # sequential HELLO, REGISTER, HAVE took three round trips; pipelined they take one (+ the TCP connect)
    assert out["fresh_s"] < 2 * RTT, out  # type: ignore[operator]
    assert out["reused_s"] < 1.6 * RTT, out  # type: ignore[operator]
    assert out["pool"].idle_count() == 0  # type: ignore[attr-defined]

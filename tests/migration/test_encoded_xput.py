"""XPUT containers a tier writes the same way are stored as they arrive, on two real daemons.

Both daemons keep their disk tier as int8 containers (``--tier-codecs disk=quant:bits=8``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvstore.checksum import checksum
from kvstore.client import AsyncClient, ChunkCorrupt
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.container import unpack
from kvstore.keys import Namespace
from kvstore.service.migration import transfer_wire as wire
from kvstore.spec import KVSpec, ModelFingerprint
from tests.migration.transfer_helpers import float_chunks, read_chunks, store_chunks
from tests.service.daemon_fixtures import ADMIN_TOKEN, HAVE_DATAPLANE, TOKEN_A, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")
NS = Namespace("tenant-a", KVSpec(ModelFingerprint("enc-xput"), 4, 4, 64, "float16"), chunk_tokens=16)
CHUNK = NS.chunk_nbytes
INT8 = {"bits": 8}
INT8_PARAMS = {"bits": 8, "exact_tokens": 1, "format": "int", "group": "kivi", "group_size": 128,
               "scale_dtype": "float16"}  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("encx")
    args = ["--tier-codecs", "disk=quant:bits=8"]
    a = DaemonProc(root / "a", tokens=TOKENS, name="a", args=args).start()
    b = DaemonProc(root / "b", tokens=TOKENS, name="b", args=args).start()
    yield a, b
    a.stop()
    b.stop()


def _tier(d: DaemonProc, name: str) -> dict[str, Any]:
    stats = d.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
    return next(t for t in stats["tiers"] if t["name"] == name)


def _container(chunk: np.ndarray, params: dict[str, Any]) -> bytes:
    return make_codec("quant", params).encode(chunk.view(np.uint8).reshape(-1), ChunkLayout(NS.spec, NS.chunk_tokens))


def _decoded(blob: bytes) -> bytes:
    out = np.empty(CHUNK, np.uint8)
    make_codec("quant").decode_into(blob, out)
    return out.tobytes()


async def _client(d: DaemonProc) -> AsyncClient:
    c = await AsyncClient.connect(f"kvstore://127.0.0.1:{d.port}", token=TOKEN_A, retries=0)
    await c.register(NS)
    return c


def test_a_container_the_disk_tier_writes_is_stored_as_it_arrived(pair: tuple[DaemonProc, DaemonProc]) -> None:
    _, b = pair
    keys, chunks = float_chunks(NS, 4, seed=21)
    blobs = [_container(c, INT8) for c in chunks]
    other = _container(chunks[3], {"bits": 8, "group": "token"})  # int8, other params than the tier's

    async def go() -> None:
        c = await _client(b)
        try:
            have = await wire.have(c, NS, keys)
            assert have.present == [False] * 4
            assert [(s.codec, dict(s.params)) for s in have.stores] == [("quant", INT8_PARAMS)]
            before = _tier(b, "disk")
            t0 = time.perf_counter()
            r = await wire.xput(c, NS, keys[:2], blobs[:2], ["quant"] * 2, [None, None])
            wall = time.perf_counter() - t0
            assert r.stored == [True, True] and r.encoded == [True, True]
            # the disk writes are the peer's store time, reported apart from the checks (no decoding)
            assert 0 < r.store_s < wall and 0 < r.decode_s < wall and r.busy_s == r.decode_s + r.store_s
            after = _tier(b, "disk")
            assert after["puts"] == before["puts"] + 2
            assert after["put_bytes"] - before["put_bytes"] == len(blobs[0]) + len(blobs[1])  # the containers
            assert _tier(b, "cpu")["entries"] == 0  # nothing decoded into the top tier
            assert (await wire.have(c, NS, keys[:2])).present == [True, True]
            # a corrupted container (valid wire checksum, broken section) is refused, nothing stored
            broken = bytearray(blobs[2])
            broken[-5] ^= 0x40
            with pytest.raises(ChunkCorrupt):
                await wire.xput(c, NS, keys[2:3], [bytes(broken)], ["quant"], [None])
            assert (await wire.have(c, NS, keys[2:3])).present == [False]
            assert _tier(b, "disk")["puts"] == after["puts"]
            # another group than the tier's: decoded here and stored raw (top tier, then written through)
            r = await wire.xput(c, NS, keys[3:4], [other], ["quant"], [None])
            assert r.stored == [True] and r.encoded == [False] and r.decode_s > 0 and r.store_s > 0
            assert _tier(b, "cpu")["entries"] == 1
        finally:
            await c.close()

    asyncio.run(go())
    got = read_chunks(b.port, TOKEN_A, NS, [keys[0], keys[1], keys[3]], CHUNK)
    assert got == [_decoded(blobs[0]), _decoded(blobs[1]), _decoded(other)]  # read from disk, decoded there
    assert _tier(b, "cpu")["entries"] == 3  # the two disk hits were promoted


def test_a_lossless_container_keeps_its_raw_checksum(tmp_path: Any) -> None:
    d = DaemonProc(tmp_path / "l", tokens=TOKENS, args=["--tier-codecs", "disk=lossless"]).start()
    try:
        keys, chunks = float_chunks(NS, 2, seed=22)
        raw = [c.view(np.uint8).reshape(-1) for c in chunks]
        blobs = [make_codec("lossless").encode(r, ChunkLayout(NS.spec, NS.chunk_tokens)) for r in raw]

        async def go() -> None:
            c = await _client(d)
            try:
                r = await wire.xput(c, NS, keys, blobs, ["lossless"] * 2, [checksum(raw[0]), bytes(16)])
                # stored without decoding; the wrong raw checksum of the second is found on its first read
                assert r.encoded == [True, True]
            finally:
                await c.close()

        asyncio.run(go())
        assert read_chunks(d.port, TOKEN_A, NS, keys, CHUNK) == [raw[0].tobytes(), None]
        stats = d.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
        assert stats["decode_errors"] == 1
    finally:
        d.stop()


def test_a_push_of_chunks_held_encoded_sends_and_stores_the_containers(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = float_chunks(NS, 6, seed=23)
    store_chunks(a.port, TOKEN_A, NS, keys, chunks)
    deadline = time.monotonic() + 20
    while _tier(a, "disk")["entries"] < 6 and time.monotonic() < deadline:  # written through as int8
        time.sleep(0.05)
    before = _tier(b, "disk")["puts"]
    body = {"namespace": NS.id.hex(), "peer": f"kvstore://127.0.0.1:{b.port}", "token": TOKEN_A, "codec": "int8",
            "keys": [k.hex() for k in keys]}  # fmt: skip
    tid = a.call("POST", "/v1/transfers", body, TOKEN_A).json()["id"]
    while (p := a.call("GET", f"/v1/transfers/{tid}", token=TOKEN_A).json())["state"] == "running":
        time.sleep(0.05)
    assert p["state"] == "done" and p["codecs"] == {"int8": 6}, p
    assert _tier(b, "disk")["puts"] == before + 6
    held = [_container(c, INT8) for c in chunks]  # what A's disk tier wrote (the coder is deterministic)
    assert p["bytes_sent"] == sum(len(h) for h in held)
    assert all(unpack(h).params == INT8_PARAMS for h in held)
    assert read_chunks(b.port, TOKEN_A, NS, keys, CHUNK) == [_decoded(h) for h in held]

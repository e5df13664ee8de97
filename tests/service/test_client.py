"""kvstore.client against a data-plane server in a real process: TCP and shared memory.

Real bf16 torch tensors round-trip bit for bit both ways; many threads and
many asyncio tasks read back exactly what was put; the shared-memory path is
taken only where offered; errors arrive as typed exceptions; a dead daemon is
RemoteUnavailable and a restarted one is found again; docs/client.md's
example runs as written.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.client import (
    AsyncClient,
    ChunkCorrupt,
    Client,
    InvalidInput,
    PayloadTooLarge,
    RemoteUnavailable,
    UnknownNamespace,
)
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from tests.service.dataplane_fixtures import DataPlaneProcess, start_dataplane, wait_until

REPO = Path(__file__).resolve().parents[2]
SPEC = KVSpec(ModelFingerprint("llama-mini"), num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")
CHUNK_TOKENS = 64  # 4 x 2 x 64 x 2 x 64 x 2 bytes = 128 KiB per chunk


@pytest.fixture(scope="module")
def server() -> Iterator[DataPlaneProcess]:
    """One server for the module (tests use namespaces of their own); at most 16 MiB per request."""
    dp = start_dataplane("--max-payload", "16MiB", "--max-inflight", "32MiB", cpu_bytes="256MiB")
    try:
        yield dp
    finally:
        dp.stop()


def _ns(tenant: str) -> Namespace:
    return Namespace(tenant, SPEC, chunk_tokens=CHUNK_TOKENS)


def _tensors(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.chunk_shape(CHUNK_TOKENS), generator=g).to(torch.bfloat16) for _ in range(n)]


def _url(dp: DataPlaneProcess, transport: str) -> str:
    return dp.unix_url if transport == "shm" else dp.tcp_url


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_bf16_tensors_round_trip(server: DataPlaneProcess, transport: str) -> None:
    ns = _ns(f"roundtrip-{transport}")
    tokens = torch.arange(5 * CHUNK_TOKENS + 17)
    keys = prefix_keys(ns, tokens)
    chunks = _tensors(len(keys), seed=1)
    with Client.connect(_url(server, transport), verify=True) as kv:
        assert (kv.info.shm_path is not None) == (transport == "shm")
        assert kv.register(ns) == ns
        assert kv.put_many(ns, keys, chunks) == [True] * 5
        hit = kv.lookup(ns, tokens)
        assert hit.hit_tokens == 5 * CHUNK_TOKENS and hit.tiers == ("cpu",) * 5 and hit.lease is not None
        outs = [torch.empty_like(c) for c in chunks]
        assert kv.get_many(ns, hit.keys, outs, lease=hit.lease) == [chunks[0].numel() * 2] * 5
        assert all(torch.equal(o, c) for o, c in zip(outs, chunks))
        arr = np.empty(chunks[0].numel() * 2, dtype=np.uint8)  # numpy out, a numpy chunk in
        assert (
            kv.get(ns, keys[2], arr) == arr.size
            and arr.tobytes() == chunks[2].view(torch.uint8).numpy().tobytes()
        )
        assert kv.put(ns, ChunkKey(b"n" * 32), np.arange(1000, dtype=np.float32))
        back = np.empty(1000, dtype=np.float32)
        assert kv.get(ns, ChunkKey(b"n" * 32), back) == 4000 and np.array_equal(back, np.arange(1000))
        stats = kv.stats()
        assert stats.store is not None and stats.store["top_pinned"] == 0 and stats.reservations == 0
        used = "SHM_GET" in stats.requests and "SHM_COMMIT" in stats.requests
        assert used == (transport == "shm")
        assert kv.delete(ns, keys[0]) and kv.get(ns, keys[0], outs[0]) is None
        assert kv.clear(ns) == 5


def _content(key: bytes) -> np.ndarray:
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, 64 << 10, dtype=np.uint8)


def test_sixteen_threads_get_exactly_what_was_put(server: DataPlaneProcess) -> None:
    ns = _ns("threads")
    keys = [ChunkKey(bytes([i, j]) * 16) for i in range(16) for j in range(8)]
    errors: list[BaseException] = []
    with (
        Client.connect(server.unix_url, pool_size=4) as shm,
        Client.connect(server.tcp_url, pool_size=4) as tcp,
    ):
        shm.register(ns)

        def worker(t: int) -> None:
            # threads 0-7 each have a client of their own; 8-15 share the two pooled ones
            own = Client(server.unix_url if t % 2 else server.tcp_url, pool_size=1) if t < 8 else None
            kv = own or (shm if t % 2 else tcp)
            try:
                mine = keys[t * 8 : (t + 1) * 8]
                assert kv.put_many(ns, mine, [_content(k) for k in mine]) == [True] * 8
                for r in range(3):  # read others' chunks too, as they appear
                    for k in keys[((t + r) % 16) * 8 : ((t + r) % 16 + 1) * 8]:
                        out = np.empty(64 << 10, dtype=np.uint8)
                        size = kv.get(ns, k, out)
                        assert size is None or (size == out.size and np.array_equal(out, _content(k)))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                if own is not None:
                    own.close()

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors[:3]
        outs = [np.empty(64 << 10, dtype=np.uint8) for _ in keys]
        assert tcp.get_many(ns, keys, outs) == [64 << 10] * len(keys)
        assert all(np.array_equal(o, _content(k)) for o, k in zip(outs, keys))
        stats = tcp.stats()
        assert stats.store is not None and stats.store["top_pinned"] == 0


def test_sixteen_asyncio_clients_get_exactly_what_was_put(server: DataPlaneProcess) -> None:
    ns = _ns("asyncio")

    async def client(c: int) -> None:
        url = server.unix_url if c % 2 else server.tcp_url
        async with await AsyncClient.connect(url, pool_size=2) as kv:
            await kv.register(ns)
            mine = [ChunkKey(bytes([c, j, 7]) * 10 + b"xy") for j in range(6)]
            assert await kv.put_many(ns, mine, [_content(k) for k in mine]) == [True] * 6
            outs = [np.empty(64 << 10, dtype=np.uint8) for _ in mine]
            sizes = await asyncio.gather(*(kv.get(ns, k, o) for k, o in zip(mine, outs)))  # pipelined
            assert sizes == [64 << 10] * 6
            assert all(np.array_equal(o, _content(k)) for o, k in zip(outs, mine))
            hit = await kv.lookup(ns, keys=mine)
            assert hit.hit_chunks == 6 and await kv.release(hit)

    async def main() -> None:
        await asyncio.gather(*(client(c) for c in range(16)))

    asyncio.run(main())
    with Client.connect(server.tcp_url) as kv:
        stats = kv.stats()
        assert stats.store is not None and stats.store["top_pinned"] == 0 and stats.shm_pins == 0


def test_typed_errors(server: DataPlaneProcess) -> None:
    ns = _ns("errors")
    with Client.connect(server.tcp_url) as kv, Client.connect(server.unix_url) as shm:
        with pytest.raises(UnknownNamespace):
            kv.get(ns, b"k" * 32, bytearray(10))
        kv.register(ns)
        key = ChunkKey(b"e" * 32)
        assert kv.put(ns, key, b"0123456789" * 100)
        for client in (kv, shm):
            with pytest.raises(InvalidInput, match="holds 10 bytes"):
                client.get(ns, key, bytearray(10))
            with pytest.raises(InvalidInput, match="read-only"):
                client.get(ns, key, bytes(1000))
            with pytest.raises(InvalidInput, match="32 bytes"):
                client.get(ns, b"short", bytearray(10))
        assert shm.get(ns, key, bytearray(1000)) == 1000  # the failed gets released their pins
        stats = kv.stats()
        assert stats.store is not None and stats.store["top_pinned"] == 0 and stats.shm_pins == 0
        with pytest.raises(InvalidInput, match="tokens or keys"):
            kv.lookup(ns)
        with pytest.raises(InvalidInput, match="exceeds the daemon's limit"):
            kv.put(ns, key, bytes(17 << 20))
        before = kv.stats().requests.get("PUT", 0)
        assert kv.put_many(ns, [b"a" * 32, b"b" * 32], [bytes(9 << 20)] * 2) == [True, True]
        assert kv.stats().requests["PUT"] == before + 2  # batched within the daemon's 16 MiB
        before = kv.stats().requests.get("SHM_RESERVE", 0)
        assert shm.put_many(ns, [b"c" * 32, b"d" * 32, b"e" * 32], [bytes(12 << 20)] * 3) == [True] * 3
        assert kv.stats().requests["SHM_RESERVE"] == before + 2  # 32 MiB reserved at most
    assert issubclass(PayloadTooLarge, InvalidInput) and issubclass(ChunkCorrupt, Exception)


def test_a_dead_daemon_is_remote_unavailable_and_a_restarted_one_is_found(tmp_path: Path) -> None:
    sock = f"/tmp/kvs-restart-{os.getpid()}.sock"
    dp = start_dataplane(unix_path=sock)
    ns = _ns("restart")
    kv = Client(f"unix://{sock}", retries=2, backoff_s=0.01, timeout_s=5)
    try:
        kv.register(ns)
        assert kv.put(ns, b"r" * 32, b"before")
        first_arena = kv.info.shm_path
        dp.stop()
        with pytest.raises(RemoteUnavailable):
            kv.ping()
        dp = start_dataplane(unix_path=sock)
        kv.register(ns)  # the pool dropped the dead connections; a new one found the new daemon
        assert kv.info.shm_path != first_arena and kv.get(ns, b"r" * 32, bytearray(6)) is None
        assert kv.put(ns, b"r" * 32, b"after!") and kv.get(ns, b"r" * 32, out := bytearray(6)) == 6
        assert bytes(out) == b"after!"
    finally:
        kv.close()
        dp.stop()
    with pytest.raises(RemoteUnavailable):
        Client.connect(f"unix://{sock}", retries=1, backoff_s=0.01)

    async def dead() -> None:
        with pytest.raises(RemoteUnavailable):
            await AsyncClient.connect(f"unix://{sock}", retries=1, backoff_s=0.01)

    asyncio.run(dead())


def test_the_documented_example_runs(server: DataPlaneProcess) -> None:
    text = (REPO / "docs" / "client.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks, "docs/client.md has no python example"
    for url, expect in ((server.unix_url, "shared memory"),):  # the TCP path is the same code below the client
        env = {**os.environ, "KVSTORE_URL": url}
        out = subprocess.run(
            [sys.executable, "-c", blocks[0]],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == f"512 ('cpu', 'cpu') {expect}"


@pytest.fixture(scope="module")
def layered() -> Iterator[DataPlaneProcess]:
    """A server whose 1 MiB top tier sits on an 8 MiB second CPU tier."""
    dp = start_dataplane("--lower-cpu-bytes", "8MiB", cpu_bytes="1MiB")
    try:
        yield dp
    finally:
        dp.stop()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_chunks_only_a_lower_tier_holds_are_read_and_prefetched(layered: DataPlaneProcess, transport: str) -> None:
    ns = _ns(f"lower-{transport}")
    keys = [ChunkKey(bytes([i]) * 32) for i in range(8)]
    data = [np.full(256 << 10, i, dtype=np.uint8) for i in range(8)]
    with Client.connect(_url(layered, transport)) as kv:
        kv.register(ns)
        for key, chunk in zip(keys, data):  # one by one: evicted chunks are already written below
            assert kv.put(ns, key, chunk)
        assert wait_until(lambda: kv.lookup(ns, keys=keys, lease=False).hit_chunks == 8)
        tiers = kv.lookup(ns, keys=keys, lease=False).tiers
        assert "cpu-lower" in tiers and "cpu" in tiers
        lower = [k for k, t in zip(keys, tiers) if t == "cpu-lower"]
        assert kv.prefetch(ns, lower[:1]) == 1  # promoted into the top tier
        outs = [np.empty(256 << 10, dtype=np.uint8) for _ in keys]
        for key, out, chunk in zip(keys, outs, data):  # each read of a lower chunk promotes it
            assert kv.get(ns, key, out) == out.size and np.array_equal(out, chunk)
        hit = kv.lookup(ns, keys=keys[:4])
        assert hit.hit_chunks == 4
        assert kv.get_many(ns, keys[:4], outs[:4], lease=hit.lease) == [256 << 10] * 4
        assert all(np.array_equal(o, c) for o, c in zip(outs[:4], data))
        stats = kv.stats()
        assert stats.store is not None and stats.store["top_pinned"] == 0 and stats.shm_pins == 0
        assert kv.clear(ns) >= 8


def test_shared_memory_puts_are_one_copy_by_default_and_verified_on_request(server: DataPlaneProcess) -> None:
    ns = Namespace("verify", KVSpec(ModelFingerprint("tiny"), 2, 2, 8, "float16"), chunk_tokens=16)
    data = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8)
    with Client.connect(server.unix_url) as plain, Client.connect(server.unix_url, verify=True) as checked:
        plain.register(ns)
        written = lambda: plain.stats().requests.get("SHM_WRITTEN", 0)  # noqa: E731
        before = written()
        assert plain.put(ns, b"vp" * 16, data)
        assert written() == before  # no hashing steps: one plain copy
        assert checked.put(ns, b"vv" * 16, data)
        assert written() > before  # the daemon hashed while the client copied, then compared
        for key in (b"vp" * 16, b"vv" * 16):
            out = np.empty_like(data)
            assert checked.get(ns, key, out) == data.size and np.array_equal(out, data)  # verify=True read

        async def aio() -> None:
            async with await AsyncClient.connect(server.unix_url, verify=True) as kv:
                assert await kv.put(ns, b"va" * 16, data)
                out = np.empty_like(data)
                assert await kv.get(ns, b"va" * 16, out) == data.size and np.array_equal(out, data)

        asyncio.run(aio())
        plain.delete_many(ns, [b"vp" * 16, b"vv" * 16, b"va" * 16])

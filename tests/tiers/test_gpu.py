"""The GPU tier and its staged copies: the same results as the CPU tier.

Every tier test runs twice: on :class:`SimulatedBackend` (CPU tensors and a
copy stream that runs its copies only when waited on, so a slot reused too
early shows as wrong bytes) in every run, and on CUDA (marker ``gpu``) where
a device is present. Inputs are drawn fresh each run; the seed is printed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidInput, KVStoreError
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.models import torch_threads
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.gpu import GPUTier, GPUTierConfig, cuda_available
from kvstore.tiers.gpu_staging import (
    CudaBackend,
    DeviceBackend,
    Piece,
    SimulatedBackend,
    StagedCopier,
    StagingPool,
    split,
)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA device on this machine")
META = ChunkMeta(NamespaceId(b"n" * 32), 0, b"")
POISON = 0xA5
SLOT = 64 << 10  # small staging slots: a 1 MiB chunk moves in 16 pieces


@pytest.fixture(autouse=True)
def one_thread() -> object:
    with torch_threads(1):
        yield


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def fresh_generator(what: str) -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{what} seed {seed}")
    return torch.Generator().manual_seed(seed)


def sim() -> DeviceBackend:
    return SimulatedBackend()


def cuda() -> DeviceBackend:
    return CudaBackend("cuda:0")


BACKENDS = [
    pytest.param(sim, id="simulated"),
    pytest.param(cuda, id="cuda", marks=[pytest.mark.gpu, needs_cuda]),
]


def tier(backend: DeviceBackend, capacity: int = 4 << 20, **kw: int) -> GPUTier:
    config = GPUTierConfig(capacity_bytes=capacity, staging_slot_bytes=SLOT, **kw)
    return GPUTier(config, backend=backend)


def device_tensor(backend: DeviceBackend, host: torch.Tensor) -> torch.Tensor:
    t = backend.device_buffer(host.numel())
    t.copy_(host)
    return t


# ---------------------------------------------------------------- pieces and the pool


def test_split_covers_every_byte_once() -> None:
    assert split(0, 10) == []
    assert split(10, 10) == [Piece(0, 10)]
    assert split(25, 10) == [Piece(0, 10), Piece(10, 10), Piece(20, 5)]
    with pytest.raises(InvalidInput):
        split(10, 0)
    with pytest.raises(InvalidInput):
        split(-1, 4)


def test_staging_pool_lends_each_slot_to_one_holder() -> None:
    pool = StagingPool(SimulatedBackend(), slots=3, slot_bytes=4096)
    a = pool.lease(2)
    assert pool.free == 1 and len(a.buffers) == 2
    ptrs = {t.data_ptr() for t in a.buffers}
    a.release()
    a.release()  # idempotent
    assert pool.free == 3
    b = pool.lease(3)
    assert ptrs < {t.data_ptr() for t in b.buffers}  # the same buffers, reused: none allocated per lease
    b.release()
    with pytest.raises(InvalidInput):
        pool.lease(4)
    with pytest.raises(InvalidInput):
        pool.lease(0)
    with pytest.raises(InvalidInput):
        StagingPool(SimulatedBackend(), slots=0, slot_bytes=4096)


def test_staging_pool_waits_for_slots_and_refuses_a_double_give_back() -> None:
    pool = StagingPool(SimulatedBackend(), slots=2, slot_bytes=4096)
    held = pool.lease(2)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(len(pool.lease(1).buffers)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # no slot free: the second transfer waits
    held.release()
    waiter.join(5)
    assert got == [1] and pool.waits == 1 and pool.free == 1
    with pytest.raises(KVStoreError, match="twice"):
        pool._give_back({pool._free[0]: torch.empty(1)})  # a slot that is already free


def test_simulated_stream_runs_copies_late() -> None:
    """A copy reads its source when the stream runs it, not when it is queued (as on a GPU)."""
    backend = SimulatedBackend()
    stream = backend.stream()
    src, dst = torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
    stream.copy(dst, src)
    mark = stream.mark()
    src.fill_(9)
    assert not dst.any()
    mark.wait()
    assert (dst == 9).all() and backend.log == ["queue 1", "run 1"]


# ---------------------------------------------------------------- staged copies


def test_staged_upload_double_buffers() -> None:
    """Piece i + 1 is filled and queued while piece i is in flight; a slot is refilled only after its upload ran."""
    backend = SimulatedBackend()
    copier = StagedCopier(backend, StagingPool(backend, 2, 4096), depth=2)
    src = torch.randint(0, 256, (5 * 4096 + 100,), dtype=torch.uint8, generator=fresh_generator("upload"))
    dst = backend.device_buffer(src.numel() + 64)
    dst.fill_(POISON)
    copier.copy(dst, src)
    assert torch.equal(dst[: src.numel()], src) and (dst[src.numel() :] == POISON).all()
    log = backend.log
    assert log.index("queue 2") < log.index("run 1")  # two pieces in flight at once
    for piece in range(3, 7):  # piece n reuses the slot of piece n - 2: queued only after that ran
        assert log.index(f"run {piece - 2}") < log.index(f"queue {piece}")
    assert copier.stats.staged_pieces == 6 and copier.stats.staged_bytes == src.numel()
    assert copier.pool.free == 2


def test_staged_download_double_buffers() -> None:
    backend = SimulatedBackend()
    copier = StagedCopier(backend, StagingPool(backend, 3, 4096), depth=2)
    data = torch.randint(0, 256, (4 * 4096 + 7,), dtype=torch.uint8, generator=fresh_generator("download"))
    src = device_tensor(backend, data)
    out = torch.full((data.numel() + 5,), POISON, dtype=torch.uint8)
    copier.copy(out, src)
    assert torch.equal(out[: data.numel()], data) and (out[data.numel() :] == POISON).all()
    log = backend.log
    assert log.index("queue 2") < log.index("run 1")  # the next download is queued before the CPU drains one
    for piece in range(3, 6):
        assert log.index(f"run {piece - 2}") < log.index(f"queue {piece}")
    assert copier.pool.free == 3


def test_pinned_and_device_buffers_are_copied_directly() -> None:
    backend = SimulatedBackend()
    copier = StagedCopier(backend, StagingPool(backend, 2, 4096))
    pinned = backend.pinned_buffer(3 * 4096)
    pinned.copy_(torch.randint(0, 256, (3 * 4096,), dtype=torch.uint8, generator=fresh_generator("direct")))
    dev, dev2 = backend.device_buffer(3 * 4096), backend.device_buffer(3 * 4096)
    copier.copy(dev, pinned)
    copier.copy(dev2, dev)
    assert torch.equal(dev2, pinned)
    assert copier.stats.direct_bytes == 6 * 4096 and copier.stats.staged_bytes == 0
    with pytest.raises(InvalidInput, match="on the device"):
        copier.copy(torch.empty(4, dtype=torch.uint8), torch.empty(4, dtype=torch.uint8))
    with pytest.raises(InvalidInput, match="into a buffer of"):
        copier.copy(backend.device_buffer(4), torch.empty(8, dtype=torch.uint8))


# ---------------------------------------------------------------- the tier, on both backends


def test_gpu_config_validation() -> None:
    for bad in (
        {"device": "cpu"},
        {"capacity_bytes": 0},
        {"policy": "nope"},
        {"staging_slots": 0},
        {"staging_slot_bytes": 100},
        {"staging_depth": 5},
        {"max_chunk_bytes": 2 << 20},
    ):
        with pytest.raises(ValueError):
            GPUTierConfig(**{"capacity_bytes": 1 << 20, **bad})  # type: ignore[arg-type]


def test_gpu_tier_refuses_to_start_without_cuda() -> None:
    if cuda_available():
        pytest.skip("CUDA is present")
    with pytest.raises(InvalidInput, match="CUDA"):
        GPUTier(GPUTierConfig(capacity_bytes=1 << 20))


@pytest.mark.parametrize("make", BACKENDS)
def test_round_trip_matches_cpu_tier_and_evicts(make: Callable[[], DeviceBackend]) -> None:
    backend = make()
    gen = fresh_generator("gpu tier")
    gpu = tier(backend)
    cpu = CPUTier(CPUTierConfig(capacity_bytes=4 << 20, pin_memory="never"))
    sizes = [1 << 20, (1 << 20) - 3, 1 << 20, 1000, 1 << 20, 1 << 20]
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]
    for i, c in enumerate(chunks):
        assert gpu.put(k(i), c.numpy(), META) and cpu.put(k(i), c.numpy(), META)
    s = gpu.stats()
    assert s.used_bytes <= s.capacity_bytes and s.evictions == cpu.stats().evictions == 2
    for i in range(2, 6):
        n = sizes[i]
        out_host = np.full(n + 9, POISON, dtype=np.uint8)
        out_cpu = np.full(n + 9, POISON, dtype=np.uint8)
        out_dev = backend.device_buffer(n + 9)
        out_dev.fill_(POISON)
        assert gpu.get_into(k(i), out_host) == n and cpu.get_into(k(i), out_cpu) == n
        assert gpu.get_into(k(i), out_dev) == n  # type: ignore[arg-type]
        assert np.array_equal(out_host, out_cpu) and (out_host[n:] == POISON).all()
        assert torch.equal(out_dev.cpu(), torch.from_numpy(out_host))
        assert torch.equal(torch.from_numpy(out_host[:n]), chunks[i])
    assert gpu.get_into(k(0), np.empty(1 << 20, np.uint8)) is None  # evicted
    assert gpu.get_into(k(2), np.empty(10, np.uint8)) is None  # too small
    assert gpu.staging.free == gpu.staging.slots and gpu.pinned_count() == 0


@pytest.mark.parametrize("make", BACKENDS)
def test_device_and_pinned_sources_skip_the_staging(make: Callable[[], DeviceBackend]) -> None:
    backend = make()
    gpu = tier(backend)
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=fresh_generator("direct"))
    pinned = backend.pinned_buffer(data.numel())
    pinned.copy_(data)
    assert gpu.put(k(1), device_tensor(backend, data), META)  # type: ignore[arg-type]
    assert gpu.put(k(2), pinned.numpy(), META)
    assert gpu.copy_stats.staged_bytes == 0 and gpu.copy_stats.direct_bytes == 2 << 20
    view = gpu.device_view(k(1))
    assert view is not None and torch.equal(view.cpu(), data)
    pinned.fill_(POISON)
    assert gpu.get_into(k(2), pinned.numpy()) == data.numel()
    assert torch.equal(pinned, data) and gpu.copy_stats.staged_bytes == 0
    ro = data.numpy().copy()
    ro.flags.writeable = False  # a read-only view, as another tier hands out
    assert gpu.put(k(3), ro, META) and gpu.copy_stats.staged_pieces == 16


@pytest.mark.parametrize("make", BACKENDS)
def test_pins_hold_chunks_and_listeners_get_evicted_bytes(make: Callable[[], DeviceBackend]) -> None:
    gpu = tier(make(), capacity=2 << 20)
    gen = fresh_generator("evict")
    chunks = [torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=gen) for _ in range(3)]
    evicted: list[tuple[ChunkKey, np.ndarray | None]] = []
    assert gpu.put(k(0), chunks[0].numpy(), META) and gpu.put(k(1), chunks[1].numpy(), META)
    assert gpu.pin(k(0)) and gpu.pin(k(1))
    assert not gpu.put(k(2), chunks[2].numpy(), META)  # everything pinned: rejected, not evicted
    gpu.unpin(k(0))
    gpu.add_evict_listener(lambda key, meta, data: evicted.append((key, data)))
    assert gpu.put(k(2), chunks[2].numpy(), META)
    assert [key for key, _ in evicted] == [k(0)]
    got = evicted[0][1]
    assert got is not None and torch.equal(torch.from_numpy(got), chunks[0])
    gpu.unpin(k(1))
    assert gpu.pinned_count() == 0


@pytest.mark.parametrize("make", BACKENDS)
def test_concurrent_puts_and_gets_share_the_staging_pool(make: Callable[[], DeviceBackend]) -> None:
    gpu = tier(make(), capacity=16 << 20, staging_slots=3)  # fewer slots than transfers: some wait
    gen = fresh_generator("concurrent")
    chunks = [
        torch.randint(0, 256, ((1 << 20) + 17 * i,), dtype=torch.uint8, generator=gen) for i in range(8)
    ]
    errors: list[str] = []

    def worker(w: int) -> None:
        for i in range(w, len(chunks), 4):
            c = chunks[i]
            gpu.put(k(i), c.numpy(), META)
            out = np.full(c.numel(), POISON, np.uint8)
            if gpu.get_into(k(i), out) != c.numel() or not np.array_equal(out, c.numpy()):
                errors.append(f"chunk {i}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and gpu.staging.free == 3 and gpu.stats().entries == 8

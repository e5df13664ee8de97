"""The disk tier's reserve (kvstore.tiers.disk_reserve): a full file system can still be cleared.

Real ENOSPC on a 2 MiB tmpfs: the store and a ballast file fill it, then
CLEAR / DELETE must commit (the reserve is given back for it) and the tier
must accept puts again in the pages it freed, without any space freed
outside. Without a reserve (``reserve_bytes=0``) the same clear fails with
DiskFull, which shows the scenario really is a full disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvstore.errors import DiskFull, InvalidInput
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.disk import DiskTier, DiskTierConfig
from kvstore.tiers.disk_reserve import RESERVE_NAME, DiskReserve, reserve_size
from tests.tiers.test_disk import tiny_fs  # noqa: F401 (a fixture: a 2 MiB tmpfs)

NS = bytes(16)
BLOB = 1000  # small records: clearing them copies many B-tree leaves


def _key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(4, "little") * 8)


def _blob(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, BLOB, dtype=np.uint8)


def _put(t: DiskTier, i: int) -> bool:
    return t.put(_key(i), _blob(i), ChunkMeta(NamespaceId(NS), BLOB, b""))


def _fill_disk(t: DiskTier, mnt: Path) -> list[int]:
    """A 512 KiB ballast, 600 chunks (about 800 KiB with pages), then the ballast takes every block left."""
    with open(mnt / "ballast", "wb", buffering=0) as f:
        f.write(bytes(512 << 10))
        held = [i for i in range(600) if _put(t, i)]
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    return [i for i in held if t.meta(_key(i)) is not None]  # a put that met ENOSPC may have evicted


def _config(mnt: Path, reserve: int | None) -> DiskTierConfig:
    return DiskTierConfig(
        str(mnt / "store"), 16 << 20, sync="commit", max_chunk_bytes=256 << 10, reserve_bytes=reserve
    )


def test_full_disk_is_cleared_with_the_reserve(tiny_fs: Path) -> None:
    with DiskTier(_config(tiny_fs, None)) as t:
        assert t.reserve.held and os.path.getsize(tiny_fs / "store" / RESERVE_NAME) == 256 << 10
        held = _fill_disk(t, tiny_fs)
        assert held, "nothing was stored before the disk filled"
        assert t.clear() == len(held)  # commits although the file system is full
        assert t.reserve.released == 1 and not t.reserve.held
        assert all(t.meta(_key(i)) is None for i in held)
        # the pages the clear freed take new chunks, with no space freed outside
        assert sum(_put(t, 1000 + i) for i in range(8)) >= 4
        out = np.empty(BLOB, np.uint8)
        stored = [i for i in range(1000, 1008) if t.meta(_key(i)) is not None]
        assert stored and all(
            t.get_into(_key(i), out) == BLOB and np.array_equal(out, _blob(i)) for i in stored
        )
        # space comes back outside: the reserve is made again (at the next put after its retry delay)
        os.unlink(tiny_fs / "ballast")
        t.reserve._next_try = 0.0
        assert _put(t, 2000) and t.reserve.held


def test_without_a_reserve_a_full_disk_cannot_be_cleared(tiny_fs: Path) -> None:
    with DiskTier(_config(tiny_fs, 0)) as t:
        assert not t.reserve.held and not (tiny_fs / "store" / RESERVE_NAME).exists()
        held = _fill_disk(t, tiny_fs)
        with pytest.raises(DiskFull):
            t.clear()
        assert all(t.meta(_key(i)) is not None for i in held)  # nothing lost
        os.unlink(tiny_fs / "ballast")
        assert t.clear() == len(held)


def test_reserve_file(tmp_path: Path) -> None:
    assert reserve_size(1 << 20) == 256 << 10 and reserve_size(1 << 40) == 4 << 20
    assert reserve_size(64 << 20) == 1 << 20
    r = DiskReserve(str(tmp_path), 64 << 10, clock=lambda: 0.0)
    assert not r.held and r.ensure() and (tmp_path / RESERVE_NAME).stat().st_size == 64 << 10
    assert DiskReserve(str(tmp_path), 64 << 10).held  # found at the next start
    assert r.release() and not (tmp_path / RESERVE_NAME).exists() and not r.release()
    assert not r.ensure()  # not before the retry delay
    with pytest.raises(InvalidInput):
        DiskTierConfig(str(tmp_path), 1 << 20, reserve_bytes=-1)

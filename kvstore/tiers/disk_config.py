"""Configuration of the LMDB disk tier: directory, budget, durability, eviction policy, map size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvstore.errors import InvalidInput
from kvstore.tiers.disk_reserve import reserve_size
from kvstore.tiers.policies import policy_names
from kvstore.tiers.record import HEADER_BYTES

_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class DiskTierConfig:
    """Configuration of the LMDB disk tier.

    Attributes:
        path: data directory, created if missing; one process owns it at a time.
        capacity_bytes: byte budget of the stored records (104-byte header + payload each).
        sync: ``none``: commits stay in the page cache (a killed process loses
            nothing, a power loss may lose the store, which is then emptied at
            the next start); the map is preallocated and written in place.
            ``commit``: fsync at every commit (survives both).
        policy: eviction policy name (``lru``, ``lfu``, ``cost``, ``ttl``).
        ttl_s: lifetime of a chunk under the ``ttl`` policy (only there).
        max_chunk_bytes: the largest payload accepted; larger raise ChunkTooLarge.
        map_size_bytes: LMDB map size; None derives it from the budget
            (:attr:`map_size`). With ``sync="none"`` this much disk is reserved.
        reserve_bytes: blocks kept allocated in a ``reserve`` file and given
            back when a deletion cannot commit on a full file system
            (kvstore.tiers.disk_reserve); None derives it from the budget
            (:attr:`reserve`), 0 keeps none.
    """

    path: str
    capacity_bytes: int
    sync: Literal["none", "commit"] = "none"
    policy: str = "lru"
    ttl_s: float | None = None
    max_chunk_bytes: int = 256 * _MIB
    map_size_bytes: int | None = None
    reserve_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise InvalidInput("path must be a non-empty string")
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes <= HEADER_BYTES:
            raise InvalidInput(f"capacity_bytes must be an int > {HEADER_BYTES}, got {self.capacity_bytes!r}")
        if self.sync not in ("none", "commit"):
            raise InvalidInput(f"sync must be 'none' or 'commit', got {self.sync!r}")
        if self.policy not in policy_names():
            raise InvalidInput(f"unknown eviction policy {self.policy!r}; known: {policy_names()}")
        if self.ttl_s is not None and (self.policy != "ttl" or not self.ttl_s > 0):
            raise InvalidInput("ttl_s must be > 0 and only applies to policy 'ttl'")
        if not isinstance(self.max_chunk_bytes, int) or self.max_chunk_bytes < 1:
            raise InvalidInput("max_chunk_bytes must be an int >= 1")
        if self.map_size_bytes is not None and self.map_size_bytes < _MIB:
            raise InvalidInput("map_size_bytes must be at least 1 MiB")
        if self.reserve_bytes is not None and (
            not isinstance(self.reserve_bytes, int) or self.reserve_bytes < 0
        ):
            raise InvalidInput(f"reserve_bytes must be an int >= 0, got {self.reserve_bytes!r}")

    @property
    def reserve(self) -> int:
        """Bytes of the reserve file: ``reserve_bytes``, or 1/64 of the budget within 256 KiB .. 4 MiB."""
        return reserve_size(self.capacity_bytes) if self.reserve_bytes is None else self.reserve_bytes

    @property
    def map_size(self) -> int:
        """Budget + 1/4 (page rounding, B-tree) + 4 largest records in flight + 4 MiB, in whole MiB."""
        record = min(self.max_chunk_bytes + HEADER_BYTES, self.capacity_bytes)
        want = self.map_size_bytes or self.capacity_bytes * 5 // 4 + 4 * record + 4 * _MIB
        return -(-want // _MIB) * _MIB

"""The prefix index: which tiers hold each chunk key, and the longest cached prefix.

Memory is the point of its shape: one dict from the 32-byte key to a small
int whose bits name the tiers holding the chunk (bit i = the store's tier i).
CPython caches small ints, so an entry costs its dict slot plus the key's
bytes object: about 100 bytes (docs/tiers.md has the measurement).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kvstore.keys import ChunkKey

MAX_TIERS = 16


@dataclass(slots=True)
class PrefixHit:
    """The leading run of keys found, the tier bitmask of each, and the first key not found."""

    keys: list[ChunkKey]
    locations: list[int]
    missed: ChunkKey | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.keys)


def tiers_of(mask: int) -> list[int]:
    """Tier indices named by a location bitmask, fastest (lowest index) first."""
    return [i for i in range(MAX_TIERS) if mask >> i & 1]


class PrefixIndex:
    """Key -> bitmask of the tiers holding it.

    Invariant: a bit is set exactly while the store believes that tier holds
    the key; a mask of 0 is never stored (the key is removed instead).
    Thread-safe: mutations take a lock; reads rely on the dict's atomic get.
    """

    def __init__(self) -> None:
        self._where: dict[ChunkKey, int] = {}
        self._lock = threading.Lock()

    def add(self, key: ChunkKey, tier: int) -> None:
        with self._lock:
            self._where[key] = self._where.get(key, 0) | (1 << tier)

    def discard(self, key: ChunkKey, tier: int) -> None:
        with self._lock:
            self._discard_locked(key, 1 << tier)

    def remove(self, key: ChunkKey) -> None:
        with self._lock:
            self._where.pop(key, None)

    def where(self, key: ChunkKey) -> int:
        return self._where.get(key, 0)

    def longest_prefix(self, keys: Iterable[ChunkKey]) -> PrefixHit:
        """The leading keys present in some tier; consumes ``keys`` lazily and stops at the first miss."""
        found: list[ChunkKey] = []
        masks: list[int] = []
        get = self._where.get
        for key in keys:
            mask = get(key, 0)
            if not mask:
                return PrefixHit(found, masks, key)
            found.append(key)
            masks.append(mask)
        return PrefixHit(found, masks)

    def clear_tier(self, tier: int) -> None:
        with self._lock:
            bit = 1 << tier
            for key in [k for k, m in self._where.items() if m & bit]:
                self._discard_locked(key, bit)

    def _discard_locked(self, key: ChunkKey, bit: int) -> None:
        mask = self._where.get(key, 0) & ~bit
        if mask:
            self._where[key] = mask
        else:
            self._where.pop(key, None)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

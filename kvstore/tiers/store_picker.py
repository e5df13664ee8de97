"""Which tier serves a hit, and pinning hits there: the tiered store's lookups and pins.

The prefix index says which tiers hold a key (a bit mask, fastest tier
first); a lookup serves each hit from its fastest local tier and pins it
there, falling back to the next tier that still holds it when the index was
stale (the bit is cleared on the way), and ends the prefix at a hit that no
tier can serve any more unless a shared tier may still hold it.
"""

from __future__ import annotations

from kvstore.index.prefix import PrefixIndex, tiers_of
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import Tier


class TierPicker:
    """Tier choice and pinning over the store's tiers and index (both owned by the store).

    Invariants: the per-mask caches depend only on the tier list, which never changes; every pin
    this class takes is returned to the caller (``pins``) or given back before it returns.
    """

    def __init__(self, tiers: list[Tier], index: PrefixIndex) -> None:
        self.tiers = tiers
        self.index = index
        self._fastest: dict[int, int] = {}
        self._names: dict[int, str] = {}

    def belongs(self, ns_id: NamespaceId, key: ChunkKey) -> bool:
        """False if a local tier holds ``key`` for another namespace (absent keys pass: they miss anyway)."""
        fastest = self.fastest_local(self.index.where(key))
        if fastest < 0:
            return True
        meta = self.tiers[fastest].meta(key)
        return meta is None or meta.namespace == ns_id

    def pin_hits(self, found: list[ChunkKey], masks: list[int], pins: dict[ChunkKey, Tier]) -> int:
        """Pin each hit in its fastest local tier (one batch per tier); returns how many hits stand.

        A hit that no local tier can pin any more (evicted since the index saw
        it) ends the prefix there, unless a shared tier may still hold it.
        """
        first = self.fastest_local(masks[0])
        if first >= 0 and masks.count(masks[0]) == len(masks):  # fast path: one tier holds them all
            tier0 = self.tiers[first]
            pinned_all = tier0.pin_many(found)
            if all(pinned_all):
                pins.update(dict.fromkeys(found, tier0))
                return len(found)
            for key, pinned in zip(found, pinned_all):
                if pinned:
                    tier0.unpin(key)
        batches: dict[int, list[int]] = {}
        for j, mask in enumerate(masks):
            fastest = self.fastest_local(mask)
            if fastest >= 0:
                batches.setdefault(fastest, []).append(j)
        keep = len(found)
        for i, positions in batches.items():
            tier = self.tiers[i]
            for j, ok in zip(positions, tier.pin_many([found[j] for j in positions])):
                if ok:
                    pins[found[j]] = tier
                    continue
                self.index.discard(found[j], i)
                other = self.pin_fastest(found[j], masks[j] & ~(1 << i))
                if other is not None:
                    pins[found[j]] = other
                elif not any(self.tiers[t].shared for t in tiers_of(masks[j])):
                    keep = min(keep, j)
        for key in found[keep:]:
            tier_ = pins.pop(key, None)
            if tier_ is not None:
                tier_.unpin(key)
        return keep

    def fastest_local(self, mask: int) -> int:
        """Index of the fastest non-shared tier in ``mask``, or -1 (cached per mask)."""
        cached = self._fastest.get(mask)
        if cached is None:
            local = [i for i in tiers_of(mask) if not self.tiers[i].shared]
            cached = self._fastest[mask] = local[0] if local else -1
        return cached

    def fastest_name(self, mask: int) -> str:
        name = self._names.get(mask)
        if name is None:
            name = self._names[mask] = self.tiers[tiers_of(mask)[0]].name
        return name

    def pin_fastest(self, key: ChunkKey, mask: int) -> Tier | None:
        for i in tiers_of(mask):
            tier = self.tiers[i]
            if tier.shared:
                return None
            if tier.pin(key):
                return tier
            self.index.discard(key, i)
        return None


"""A contiguous byte arena with a best-fit, coalescing extent allocator.

The arena is the only owner of its free list. Extents are aligned; freeing
an extent merges it with free neighbours, so the free list never holds two
adjacent extents.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Extent:
    """``size`` bytes (a multiple of the alignment) at ``offset`` in the arena."""

    offset: int
    size: int


class ExtentAllocator:
    """Best-fit allocation of aligned extents within ``capacity`` bytes.

    Invariants: free extents never overlap nor touch (they are merged);
    ``free_bytes + allocated bytes == capacity``; freeing an extent that is
    not allocated raises (a double free is a bug in the owner).
    """

    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise InvalidInput(f"alignment must be a power of two, got {alignment}")
        if capacity < alignment:
            raise InvalidInput(f"arena capacity {capacity} is smaller than one aligned unit {alignment}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._free_at: dict[int, int] = {0: self.capacity}  # offset -> size
        self._free_end: dict[int, int] = {self.capacity: 0}  # end -> offset
        self._used: dict[int, int] = {}  # offset -> size of allocated extents
        self.free_bytes = self.capacity

    def rounded(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` occupies after alignment."""
        a = self.alignment
        return max(a, (nbytes + a - 1) // a * a)

    def allocate(self, nbytes: int) -> Extent | None:
        """The smallest free extent that fits, split to size; None if none fits."""
        size = self.rounded(nbytes)
        if size > self.free_bytes:
            return None
        best_off, best_size = -1, 0
        for off, free in self._free_at.items():
            if free >= size and (best_off < 0 or free < best_size):
                best_off, best_size = off, free
                if free == size:
                    break
        if best_off < 0:
            return None
        self._take_free(best_off, best_size)
        if best_size > size:
            self._add_free(best_off + size, best_size - size)
        self._used[best_off] = size
        self.free_bytes -= size
        return Extent(best_off, size)

    def free(self, extent: Extent) -> None:
        """Return an extent; merges with free neighbours."""
        if self._used.get(extent.offset) != extent.size:
            raise InvalidInput(f"free of an extent that is not allocated: {extent}")
        del self._used[extent.offset]
        self.free_bytes += extent.size
        off, size = extent.offset, extent.size
        left = self._free_end.get(off)
        if left is not None:
            left_size = self._free_at[left]
            self._take_free(left, left_size)
            off, size = left, size + left_size
        right_size = self._free_at.get(off + size)
        if right_size is not None:
            self._take_free(off + size, right_size)
            size += right_size
        self._add_free(off, size)

    def largest_free(self) -> int:
        return max(self._free_at.values(), default=0)

    def free_extents(self) -> list[Extent]:
        """Free extents sorted by offset (for tests and diagnostics)."""
        return [Extent(o, s) for o, s in sorted(self._free_at.items())]

    @property
    def allocated(self) -> int:
        return len(self._used)

    def _take_free(self, off: int, size: int) -> None:
        del self._free_at[off]
        del self._free_end[off + size]

    def _add_free(self, off: int, size: int) -> None:
        self._free_at[off] = size
        self._free_end[off + size] = off

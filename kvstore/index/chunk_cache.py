"""The chunk-cache index: content key -> a passage's KV, at any position.

A chunk-cache is the KV of a run of tokens computed on its own (a RAG
passage). Its key names the tokens alone, so it is found wherever the
passage recurs; reusing it at a new position needs blending (kvstore.blend).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvstore.keys import ChunkKey


@dataclass(frozen=True, slots=True)
class ChunkCacheEntry:
    """What is known of a stored chunk-cache besides its bytes.

    ``start_position`` is the position of its first token when its KV was
    computed (RoPE was applied at ``start_position .. start_position+num_tokens-1``).
    """

    key: ChunkKey
    num_tokens: int
    start_position: int


class ChunkCacheIndex:
    """Content key -> entry. Invariant: an entry is present only while some tier holds its bytes."""

    def __init__(self) -> None:
        self._entries: dict[ChunkKey, ChunkCacheEntry] = {}
        self._lock = threading.Lock()

    def add(self, entry: ChunkCacheEntry) -> None:
        with self._lock:
            self._entries[entry.key] = entry

    def get(self, key: ChunkKey) -> ChunkCacheEntry | None:
        return self._entries.get(key)

    def find(self, keys: list[ChunkKey]) -> list[ChunkCacheEntry | None]:
        """The entry of each key (None where absent), in order; hits need not be leading."""
        get = self._entries.get
        return [get(k) for k in keys]

    def discard(self, key: ChunkKey) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

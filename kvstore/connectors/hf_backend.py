"""Where the HuggingFace connector keeps its chunks: an in-process store or the daemon.

:class:`HFBackend` is the handful of calls a request needs (register,
lookup by keys, get, put, release). :class:`StoreBackend` wraps a
:class:`~kvstore.tiers.store.TieredStore` in this process; :class:`ClientBackend`
wraps a :class:`~kvstore.client.Client` of a daemon. Neither closes what it
wraps: the caller built the store or client and owns it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.buffers import BufferLike
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, Namespace, content_key
from kvstore.tiers.store import TieredStore

if TYPE_CHECKING:
    from kvstore.client import Client


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The leading chunks of a query the backend holds.

    Attributes:
        keys: their keys, in order (a prefix of the keys asked about).
        tiers: the fastest tier holding each.
        lease: the lease pinning them until read, or None when nothing was hit.
    """

    keys: tuple[ChunkKey, ...]
    tiers: tuple[str, ...]
    lease: int | None

    @property
    def chunks(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class PassageHit:
    """A passage's KV read by content key: its size in bytes and the first position it was computed at."""

    nbytes: int
    start_position: int


class HFBackend(ABC):
    """Chunk storage as the connector uses it.

    Invariant: a lease returned by :meth:`lookup` is given back by reading
    every chunk it pins (a get consumes its pin) or by :meth:`release`.
    """

    @abstractmethod
    def register(self, ns: Namespace) -> Namespace:
        """Make ``ns`` usable (idempotent); returns the namespace to use from now on."""

    @abstractmethod
    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> PrefixHit:
        """How many of ``keys``, from the first, are stored; pins them under a lease."""

    def lookup_waiting(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None,
                       wait_s: float) -> PrefixHit:
        """:meth:`lookup`, waiting up to ``wait_s`` for chunks announced as on their way (a hand-off's
        decode side); a backend without announcements looks up at once."""
        return self.lookup(ns, keys, ttl_s)

    @abstractmethod
    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        """Copy each chunk into its buffer; its size, or None on a miss."""

    @abstractmethod
    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], chunks: Sequence[BufferLike]) -> list[bool]:
        """Store chunks; for each, whether the store holds it now."""

    @abstractmethod
    def release(self, lease: int) -> None:
        """Give back what is left of a lease (harmless if already gone)."""

    def flush(self) -> None:
        """Wait for the backend's own background writes (lower tiers), where it has any."""

    def put_passage(self, ns: Namespace, tokens: Sequence[int], data: BufferLike) -> bool:
        """Store a passage's KV (computed on its own at positions 0..) under its content key; whether it is held.

        The content key (``kvstore.keys.content_key``) hashes the tokens alone,
        so the passage is found again wherever it recurs in a later prompt.
        """
        return self.put_many(ns, [content_key(ns, tokens)], [data])[0]

    def get_passages(
        self, ns: Namespace, passages: Sequence[Sequence[int]], outs: Sequence[BufferLike]
    ) -> list[PassageHit | None]:
        """Read each passage's KV by content key into its buffer (sized for the passage); None where missing."""
        sizes = self.get_many(ns, [content_key(ns, p) for p in passages], outs, None)
        return [None if size is None else PassageHit(size, 0) for size in sizes]


class StoreBackend(HFBackend):
    """A tiered store in this process."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def register(self, ns: Namespace) -> Namespace:
        self.store.register_namespace(ns)
        return ns

    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> PrefixHit:
        res = self.store.lookup_keys(ns, keys, lease=True, ttl_s=ttl_s)
        return PrefixHit(res.keys, res.tiers, res.lease)

    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        return self.store.get_many(ns, keys, outs, lease)

    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], chunks: Sequence[BufferLike]) -> list[bool]:
        return [self.store.put(ns, key, chunk) for key, chunk in zip(keys, chunks, strict=True)]

    def release(self, lease: int) -> None:
        self.store.release(lease)

    def flush(self) -> None:
        self.store.flush()

    def put_passage(self, ns: Namespace, tokens: Sequence[int], data: BufferLike) -> bool:
        """Through the store's chunk-cache index (``kvstore.blend.passages.PassageCache`` finds it too)."""
        ids = [int(t) for t in tokens]
        self.store.put_chunk_cache(ns, ids, data, 0)
        return self.store.lookup_chunk_caches(ns, [ids])[0] is not None

    def get_passages(
        self, ns: Namespace, passages: Sequence[Sequence[int]], outs: Sequence[BufferLike]
    ) -> list[PassageHit | None]:
        """Through the chunk-cache index, which also knows where each passage was computed."""
        entries = self.store.lookup_chunk_caches(ns, [list(p) for p in passages])
        hits: list[PassageHit | None] = []
        for entry, ids, out in zip(entries, passages, outs, strict=True):
            size = None if entry is None or entry.num_tokens != len(ids) else self.store.get(ns, entry.key, out)
            hits.append(None if entry is None or size is None else PassageHit(size, entry.start_position))
        return hits


class ClientBackend(HFBackend):
    """A kvstore daemon through the blocking client (thread-safe, pooled)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def register(self, ns: Namespace) -> Namespace:
        return self.client.register(ns)

    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> PrefixHit:
        if not keys:
            return PrefixHit((), (), None)
        return self.lookup_waiting(ns, keys, ttl_s, 0.0)

    def lookup_waiting(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None,
                       wait_s: float) -> PrefixHit:
        if not keys:
            return PrefixHit((), (), None)
        hit = self.client.lookup(ns, keys=keys, lease=True, ttl_s=ttl_s, wait_s=wait_s)
        return PrefixHit(hit.keys, hit.tiers, hit.lease)

    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        return self.client.get_many(ns, keys, outs, lease=lease) if keys else []

    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], chunks: Sequence[BufferLike]) -> list[bool]:
        return self.client.put_many(ns, keys, chunks) if keys else []

    def release(self, lease: int) -> None:
        self.client.release(lease)


def as_backend(where: HFBackend | TieredStore | Client) -> HFBackend:
    """The backend for a store, a daemon client, or a backend given as is.

    Raises:
        InvalidInput: ``where`` is none of these.
    """
    if isinstance(where, HFBackend):
        return where
    if isinstance(where, TieredStore):
        return StoreBackend(where)
    from kvstore.client import Client

    if isinstance(where, Client):
        return ClientBackend(where)
    raise InvalidInput(f"expected a TieredStore, a kvstore Client or an HFBackend, got {type(where).__name__}")

"""The store behind an engine adapter: an in-process tiered store or the daemon.

Both engine adapters (vLLM, SGLang) talk to a :class:`ChunkBackend`, so the
choice between ``local`` and ``daemon`` (``AdapterSettings.backend``) is made
once, in :func:`open_backend`.

vLLM builds its scheduler-side and worker-side connector objects separately,
through its own factory, so in ``local`` mode nothing can hand both the same
store. :class:`SharedStores` is the one place that does: connectors of one
process naming the same ``store_id`` get the same store, reference-counted and
closed with the last one. It is a registry of explicitly opened, explicitly
closed stores (no store is created by merely importing or looking up), and a
backend can always be injected instead (tests, embedding).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.buffers import BufferLike
from kvstore.builder import TiersConfig, build_tiers
from kvstore.connectors.vllm_settings import AdapterSettings
from kvstore.errors import KVStoreError
from kvstore.events import EventQueue, StoreEvent
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.tiers.leases import LeaseId
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hit:
    """The leading run of keys a backend holds, and the lease pinning them (or None)."""

    chunks: int
    lease: int | None


class ChunkBackend(ABC):
    """Chunk storage as an engine adapter needs it.

    Invariant: every namespace used has been passed through :meth:`register`.
    """

    @abstractmethod
    def register(self, ns: Namespace) -> Namespace:
        """Make ``ns`` usable (idempotent); returns the namespace to use."""

    @abstractmethod
    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], lease: bool, ttl_s: float | None = None) -> Hit:
        """How many of ``keys``, from the first, are stored; with ``lease``, pin them."""

    @abstractmethod
    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        """Copy each chunk into its buffer; its size, or None on a miss."""

    @abstractmethod
    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], datas: Sequence[BufferLike]) -> list[bool]:
        """Store chunks; for each, whether the store holds it now."""

    @abstractmethod
    def delete_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> int:
        """Remove chunks of ``ns``; how many were held."""

    @abstractmethod
    def release(self, lease: int | None) -> None:
        """Give back a lease early (harmless if already gone)."""

    @abstractmethod
    def clear(self, ns: Namespace) -> int:
        """Remove every chunk of ``ns``; how many were removed."""

    def drain_events(self) -> list[StoreEvent]:
        """Store events since the last call (none where the store is not in this process)."""
        return []

    def namespace(self, ns_id: NamespaceId) -> Namespace | None:
        """The registered namespace with this id, if this backend knows it."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Let go of the store (idempotent)."""


class LocalBackend(ChunkBackend):
    """A :class:`TieredStore` in this process (its events land in ``queue``, if given)."""

    def __init__(self, store: TieredStore, queue: EventQueue | None = None, owner: SharedStores | None = None,
                 store_id: str = "") -> None:
        self.store = store
        self.queue = queue
        self._owner = owner
        self._store_id = store_id
        self._closed = False

    def register(self, ns: Namespace) -> Namespace:
        self.store.register_namespace(ns)
        return ns

    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], lease: bool, ttl_s: float | None = None) -> Hit:
        res = self.store.lookup_keys(ns, keys, lease=lease, ttl_s=ttl_s)
        return Hit(res.hit_chunks, res.lease)

    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        return self.store.get_many(ns, keys, outs, LeaseId(lease) if lease is not None else None)

    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], datas: Sequence[BufferLike]) -> list[bool]:
        return [self.store.put(ns, k, d) for k, d in zip(keys, datas, strict=True)]

    def delete_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> int:
        return sum(self.store.delete(ns, k) for k in keys)

    def release(self, lease: int | None) -> None:
        if lease is not None:
            self.store.release(LeaseId(lease))

    def clear(self, ns: Namespace) -> int:
        return self.store.clear(ns)

    def drain_events(self) -> list[StoreEvent]:
        return self.queue.drain() if self.queue is not None else []

    def namespace(self, ns_id: NamespaceId) -> Namespace | None:
        return next((ns for ns in self.store.namespaces() if ns.id == ns_id), None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owner is not None:
            self._owner.release(self._store_id)
        else:
            self.store.close()


class DaemonBackend(ChunkBackend):
    """The kvstore daemon, through the blocking client (pooled, thread-safe)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from kvstore.client import Client

        self.client = Client(url, token=token)
        self._registered: dict[NamespaceId, Namespace] = {}

    def register(self, ns: Namespace) -> Namespace:
        known = self._registered.get(ns.id)
        if known is None:
            known = self._registered[ns.id] = self.client.register(ns)
        return known

    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], lease: bool, ttl_s: float | None = None) -> Hit:
        if not keys:
            return Hit(0, None)
        hit = self.client.lookup(ns, keys=keys, lease=lease, ttl_s=ttl_s)
        return Hit(hit.hit_chunks, hit.lease)

    def get_many(
        self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike], lease: int | None
    ) -> list[int | None]:
        return self.client.get_many(ns, keys, outs, lease=lease) if keys else []

    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], datas: Sequence[BufferLike]) -> list[bool]:
        return self.client.put_many(ns, keys, datas) if keys else []

    def delete_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> int:
        return self.client.delete_many(ns, keys) if keys else 0

    def release(self, lease: int | None) -> None:
        if lease is not None:
            self.client.release(lease)

    def clear(self, ns: Namespace) -> int:
        return self.client.clear(ns)

    def namespace(self, ns_id: NamespaceId) -> Namespace | None:
        return self._registered.get(ns_id)

    def close(self) -> None:
        self.client.close()


class SharedStores:
    """Reference-counted in-process stores by id (see the module docstring).

    Invariant: an entry exists exactly while its count is positive; the store
    is closed when the count returns to zero.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, tuple[TieredStore, EventQueue, int]] = {}

    def open(self, settings: AdapterSettings) -> LocalBackend:
        """A backend on the store named ``settings.store_id``, built from ``settings`` if new."""
        with self._lock:
            entry = self._stores.get(settings.store_id)
            if entry is None:
                queue = EventQueue()
                entry = (_build_store(settings, queue), queue, 0)
            store, queue, count = entry
            self._stores[settings.store_id] = (store, queue, count + 1)
        return LocalBackend(store, queue, owner=self, store_id=settings.store_id)

    def release(self, store_id: str) -> None:
        with self._lock:
            entry = self._stores.get(store_id)
            if entry is None:
                return
            store, queue, count = entry
            if count > 1:
                self._stores[store_id] = (store, queue, count - 1)
                return
            del self._stores[store_id]
        store.close()

    def open_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._stores)


def _build_store(settings: AdapterSettings, queue: EventQueue) -> TieredStore:
    tiers = build_tiers(
        TiersConfig(
            cpu_bytes=settings.cpu_bytes,
            data_dir=settings.data_dir,
            disk_bytes=settings.disk_bytes,
            redis_url=settings.redis_url,
        )
    )
    try:
        return TieredStore(tiers, StoreConfig(lease_ttl_s=settings.lease_ttl_s), events=queue)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise


def release_quietly(backend: ChunkBackend, lease: int | None) -> None:
    """Give a lease back; an unreachable store is only logged (the lease expires by itself)."""
    try:
        backend.release(lease)
    except (KVStoreError, OSError) as exc:
        log.warning("could not release lease %s: %s", lease, exc)


SHARED_STORES = SharedStores()
"""The process's in-process stores for connectors vLLM builds (see the module docstring)."""


def open_backend(settings: AdapterSettings, shared: SharedStores = SHARED_STORES) -> ChunkBackend:
    """The backend ``settings`` asks for: a shared in-process store, or a daemon client."""
    if settings.backend == "daemon":
        assert settings.url is not None  # checked by AdapterSettings
        return DaemonBackend(settings.url, settings.token)
    return shared.open(settings)

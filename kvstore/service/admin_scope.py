"""Tenant scoping of the admin API: who is calling, and what they may see.

Invariant: every admin endpoint reaches namespaces, chunks and leases only
through this module. A namespace of another tenant is answered exactly like
an unknown one (404), and a chunk stored under another namespace exactly like
an absent one, so a tenant learns nothing about another tenant's data, not
even that it exists.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from kvstore.errors import UnknownNamespace
from kvstore.index.prefix import tiers_of
from kvstore.keys import ChunkKey, Namespace, NamespaceId
from kvstore.service.admin_io import hex_id
from kvstore.service.config import ALL_TENANTS
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.leases import Lease
from kvstore.tiers.store import TieredStore

_CALLER = "kvstore.caller"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one admin request.

    Attributes:
        tenant: the token's tenant; ``*`` (an admin token, or no auth configured) sees all.
    """

    tenant: str

    @property
    def is_admin(self) -> bool:
        return self.tenant == ALL_TENANTS

    def sees(self, tenant: str) -> bool:
        return self.is_admin or tenant == self.tenant


def set_caller(request: web.Request, caller: Caller) -> None:
    request[_CALLER] = caller


def caller(request: web.Request) -> Caller:
    """The caller the auth middleware attached (admin when auth is off)."""
    found = request.get(_CALLER)
    return found if isinstance(found, Caller) else Caller(ALL_TENANTS)


def visible_namespace(store: TieredStore, who: Caller, ns_hex: str) -> Namespace:
    """The registered namespace with this hex id, if ``who`` may see it.

    Raises:
        UnknownNamespace: never registered, or another tenant's (indistinguishable).
    """
    ns = store.namespace(hex_id(ns_hex))
    if not who.sees(ns.tenant):
        raise UnknownNamespace(f"unknown namespace {ns_hex[:16]}…; register it first")
    return ns


def visible_namespaces(store: TieredStore, who: Caller) -> list[Namespace]:
    return [ns for ns in store.namespaces() if who.sees(ns.tenant)]


def chunk_meta(store: TieredStore, key: ChunkKey) -> tuple[int, ChunkMeta] | None:
    """(tier index, meta) of the fastest tier holding ``key`` (remote tiers asked last), or None."""
    mask = store.index.where(key)
    order = tiers_of(mask) + [i for i, t in enumerate(store.tiers) if t.shared and not mask >> i & 1]
    for i in order:
        meta = store.tiers[i].meta(key)
        if meta is not None:
            return i, meta
    return None


def owned(store: TieredStore, ns: Namespace, key: ChunkKey) -> bool:
    """True if the chunk exists and is stored under ``ns``."""
    found = chunk_meta(store, key)
    return found is not None and found[1].namespace == ns.id


def split_owned(
    store: TieredStore, ns: Namespace, keys: Iterable[ChunkKey]
) -> tuple[list[ChunkKey], list[ChunkKey]]:
    """``keys`` split into (stored under ``ns``, absent or another namespace's)."""
    mine: list[ChunkKey] = []
    other: list[ChunkKey] = []
    for key in keys:
        (mine if owned(store, ns, key) else other).append(key)
    return mine, other


def tier_index(store: TieredStore, name: str) -> int:
    """The store's index of the tier called ``name``.

    Raises:
        ValueError: no such tier (the message lists the tiers).
    """
    for i, tier in enumerate(store.tiers):
        if tier.name == name:
            return i
    raise ValueError(f"unknown tier {name!r}; tiers: {', '.join(t.name for t in store.tiers)}")


def lease_namespace(lease: Lease) -> NamespaceId | None:
    """The namespace of a lease's chunks (a lease pins the hits of one lookup), or None if unknown."""
    for key, tier in lease.pins.items():
        meta = tier.meta(key)
        if meta is not None:
            return meta.namespace
    return None


def visible_leases(store: TieredStore, who: Caller) -> list[tuple[Lease, Namespace | None]]:
    """Live leases whose chunks belong to namespaces ``who`` may see (admins also see orphans)."""
    by_id = {ns.id: ns for ns in store.namespaces()}
    out: list[tuple[Lease, Namespace | None]] = []
    for lease in store.leases.live():
        ns_id = lease_namespace(lease)
        ns = by_id.get(ns_id) if ns_id is not None else None
        if (ns is not None and who.sees(ns.tenant)) or (ns is None and who.is_admin):
            out.append((lease, ns))
    return out


def lease_json(lease: Lease, ns: Namespace | None, max_keys: int = 1024) -> dict[str, object]:
    per_tier: dict[str, int] = {}
    for tier in lease.pins.values():
        per_tier[tier.name] = per_tier.get(tier.name, 0) + 1
    return {
        "lease": lease.id,
        "namespace": ns.id.hex() if ns is not None else None,
        "expires_in_s": round(max(0.0, lease.deadline - time.monotonic()), 3),
        "chunks": len(lease.pins),
        "tiers": per_tier,
        "keys": [k.hex() for k in list(lease.pins)[:max_keys]],
    }


def tiers_holding(store: TieredStore, key: ChunkKey, fallback: str) -> list[str]:
    """Names of the tiers the store's index says hold ``key`` (else the lookup's tier)."""
    names = [store.tiers[i].name for i in tiers_of(store.index.where(key))]
    return names or [fallback]

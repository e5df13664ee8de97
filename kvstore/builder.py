"""Build a tiered store from one validated configuration object."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kvstore.errors import InvalidInput
from kvstore.events import EventSink
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.namespace_catalog import NamespaceCatalog
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig
from kvstore.tiers.tier_codecs import CodecChoice


@dataclass(frozen=True, slots=True)
class TiersConfig:
    """Which tiers a store has and their budgets.

    Attributes:
        cpu_bytes: budget of the CPU tier (always present; it takes every put).
        policy: eviction policy of the CPU and disk tiers.
        data_dir: directory of the LMDB disk tier and of the namespace catalog
            (kvstore/tiers/namespace_catalog.py); None for no disk tier.
        disk_bytes: budget of the disk tier.
        disk_sync: ``none`` (survives a killed process) or ``commit`` (fsync per commit).
        redis_url: Redis/Valkey URL of the remote tier; None for no remote tier.
        redis_cluster: the URL names a node of a Redis Cluster.
        redis_bytes: budget this store may write to the remote tier.
        write_mode: ``write_through`` or ``write_back`` (see StoreConfig).
        codecs: tier name (``disk``, ``redis``) -> the codec it stores chunks with.
        shared_memory: put the CPU tier's arena in /dev/shm so same-user clients
            on this host get and put with one copy (the data plane's shm path).
    """

    cpu_bytes: int = 1 << 30
    policy: str = "lru"
    data_dir: str | None = None
    disk_bytes: int = 8 << 30
    disk_sync: Literal["none", "commit"] = "none"
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_bytes: int = 8 << 30
    write_mode: Literal["write_through", "write_back"] = "write_through"
    codecs: Mapping[str, CodecChoice] = field(default_factory=dict)
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.cpu_bytes <= 0 or self.disk_bytes <= 0 or self.redis_bytes <= 0:
            raise InvalidInput("tier budgets must be > 0")


def build_tiers(config: TiersConfig) -> list[Tier]:
    """The tiers named by ``config``, fastest first."""
    cpu = CPUTierConfig(capacity_bytes=config.cpu_bytes, policy=config.policy, shared_memory=config.shared_memory)
    tiers: list[Tier] = [CPUTier(cpu)]
    if config.data_dir is not None:
        from kvstore.tiers.disk import DiskTier, DiskTierConfig

        os.makedirs(config.data_dir, exist_ok=True)
        tiers.append(
            DiskTier(
                DiskTierConfig(
                    path=config.data_dir, capacity_bytes=config.disk_bytes, sync=config.disk_sync, policy=config.policy
                )
            )
        )
    if config.redis_url is not None:
        from kvstore.tiers.remote import RemoteTier, RemoteTierConfig

        tiers.append(
            RemoteTier(
                RemoteTierConfig(url=config.redis_url, cluster=config.redis_cluster, capacity_bytes=config.redis_bytes)
            )
        )
    return tiers


def build_store(
    config: TiersConfig, store_config: StoreConfig | None = None, events: EventSink | None = None
) -> TieredStore:
    """A store over the configured tiers (emitting its KV events to ``events``); the caller owns it."""
    tiers = build_tiers(config)
    try:
        chosen = store_config or StoreConfig(write_mode=config.write_mode)
        if config.codecs and not chosen.codecs:
            chosen = dataclasses.replace(chosen, codecs=config.codecs)
        catalog = NamespaceCatalog(config.data_dir) if config.data_dir is not None else None
        return TieredStore(tiers, chosen, events=events, catalog=catalog)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise

"""The local disk tier: chunks in one LMDB environment, verified on every read.

Two named databases hold each chunk under its 32-byte key, both written in
one write transaction: ``hdr`` the 104-byte record header (tiers/record.py)
and ``data`` the payload (kvstore.tiers.disk_records). A restart rebuilds the
in-memory index (kvstore.tiers.disk_index) from the headers alone; payload
pages are not read until a chunk is (kvstore.tiers.disk_open). Layout, crash
safety, budget and measurements: docs/tiers.md ("Disk tier").
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import lmdb
import numpy as np

from kvstore.buffers import U8, BufferLike, as_u8
from kvstore.checksum import CHECKSUM_BYTES, checksum
from kvstore.errors import ChunkTooLarge, DiskFull, InvalidInput, KVStoreError
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, MissReason, Tier, register_tier
from kvstore.tiers.disk_config import DiskTierConfig
from kvstore.tiers.disk_index import DiskIndex, Victims, record_bytes
from kvstore.tiers.disk_open import (
    RebuildReport,
    is_full,
    mark_closed,
    mark_open,
    open_env,
    scan_headers,
    take_ownership,
    wipe_if_unsafe,
)
from kvstore.tiers.disk_records import BadRecord, Records
from kvstore.tiers.disk_reserve import DiskReserve
from kvstore.tiers.policies import make_policy
from kvstore.tiers.record import HEADER_BYTES, RecordHeader

__all__ = ["DiskTier", "DiskTierConfig", "RebuildReport"]

log = logging.getLogger(__name__)
Clock = Callable[[], float]

_FULL_ROUNDS = 4  # write attempts of a put that finds the map or the filesystem full


class DiskTier(Tier):
    """Chunks in an LMDB environment under a byte budget, verified on every read.

    Invariants:
      * the index names exactly the records committed in LMDB (except during
        the one write transaction in flight) and ``used_bytes`` is the sum of
        ``104 + payload`` over it, at most ``capacity_bytes``;
      * a record's header and payload are written and deleted in one
        transaction, so a killed writer leaves the old state or the new one;
      * a pinned key is never evicted; a pinned key that is deleted stays
        readable until its last pin goes, then it is removed;
      * bytes are handed out only after the header names the key asked for,
        the length matches and the XXH3-128 of the copy equals the header's;
        anything else is a CORRUPT miss and the record is deleted;
      * one write transaction at a time (``_write_lock``, always taken before
        the tier lock); reads copy from a read snapshot outside both locks;
      * a deletion that fails on a full file system is retried once after
        the reserve file's blocks are given back (kvstore.tiers.disk_reserve),
        so eviction, DELETE and CLEAR work on a full disk.
    """

    kind = "disk"

    def __init__(self, config: DiskTierConfig, name: str = "disk", clock: Clock = time.monotonic) -> None:
        super().__init__(name, config.capacity_bytes)
        self.config = config
        self._clock = clock
        self._index = DiskIndex(name, self._stats, make_policy(config.policy, config.ttl_s), clock)
        self._write_lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        self._records: Records | None = None  # the databases of _env
        os.makedirs(config.path, exist_ok=True)
        self._owner = take_ownership(config.path)
        try:
            wiped = wipe_if_unsafe(config.path)
            t0 = time.perf_counter()
            good, bad = scan_headers(config)
            self._env = open_env(config)
            self._records = Records(self._env)
            self.reserve = DiskReserve(config.path, config.reserve, clock)
            self.last_rebuild = self._rebuild(good, bad, wiped, t0)
            self.reserve.ensure()
            mark_open(config.path, config.sync)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOSPC and not isinstance(exc, DiskFull):
                raise DiskFull(exc.errno, f"no room for the disk tier at {config.path}: {exc}") from exc
            raise
        except BaseException:
            self.close()
            raise

    # -- Tier ---------------------------------------------------------------------------
    def put(self, key: ChunkKey, data: BufferLike, meta: ChunkMeta) -> bool:
        """Store ``data`` and its header under ``key``, evicting by policy if needed.

        A key already stored with the same length and checksum is only touched
        (keys name their content). If the map or the filesystem is full,
        unpinned chunks are evicted by policy for a few rounds; if it still
        does not fit, the put is rejected and nothing stored is damaged.

        A given ``meta.checksum`` is stored as is, not recomputed: it was made
        where the bytes were made, so bytes damaged on their way here fail
        their first read (a CORRUPT miss) instead of being stored as good.

        Args:
            key: the 32-byte chunk key.
            data: the payload (bytes, uint8 array, CPU tensor); copied.
            meta: namespace, cost, and the payload's XXH3-128 (computed here if empty).

        Returns:
            True if stored; False if rejected (counted): larger than the budget
            with what is pinned, or no room on disk.

        Raises:
            InvalidInput: the key is not 32 bytes, ``meta.nbytes`` != len(data),
                or ``meta.checksum`` is neither empty nor 16 bytes.
            ChunkTooLarge: more than ``max_chunk_bytes``.
        """
        payload = as_u8(data)
        stored = self._check_put(key, payload, meta)
        with self._write_lock:
            ok, evicted = self._put_locked(key, payload, stored)
        for k, m in evicted:
            self._notify_evicted(k, m, None)
        return ok

    def get_into(self, key: ChunkKey, out: BufferLike, namespace: NamespaceId | None = None) -> int | None:
        """Copy the verified chunk into ``out[:n]``.

        Returns:
            n, or None on a miss (absent, evicted, expired, corrupt, ``out`` too
            small, or with ``namespace`` a record of another namespace), counted
            by reason. After a corrupt or foreign miss ``out[:n]`` is zeroed.

        Raises:
            InvalidInput: ``out`` is not a writable contiguous CPU buffer.
        """
        view = as_u8(out, writable=True)
        meta = self.meta(key) if namespace is not None else None
        if meta is not None and meta.namespace != namespace:
            self._foreign_miss()
            return None
        found = self._get(key, view)
        if found is None:
            return None
        header = found[0]
        if namespace is not None and header.namespace != namespace:
            view[: header.payload_len] = 0
            self._foreign_miss()
            return None
        return header.payload_len

    def _foreign_miss(self) -> None:
        with self._lock:
            self._stats.miss(MissReason.ABSENT)  # another namespace's chunk: as if absent

    def read(self, key: ChunkKey) -> tuple[U8, ChunkMeta] | None:
        """A verified copy of the chunk and its meta (from its header), or None on a miss (counted)."""
        meta = self.meta(key)
        out = np.empty(meta.nbytes if meta else 0, dtype=np.uint8)
        found = self._get(key, out)
        if found is None:
            return None
        header, cost = found
        n = header.payload_len
        return out[:n], ChunkMeta(header.namespace, n, header.checksum, cost)

    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        """The chunk's meta from the in-memory index (no disk access), or None if absent."""
        with self._lock:
            return self._index.meta(key)

    def delete(self, key: ChunkKey) -> bool:
        """Remove the chunk; a pinned chunk is removed when its last pin goes.

        Returns:
            True if the key was present (and not already deleted while pinned).

        Raises:
            DiskFull: LMDB could not commit the deletion; nothing changed.
        """
        return self._remove([key]) == 1

    def keys(self, namespace: NamespaceId | None = None) -> Iterator[ChunkKey]:
        """A snapshot of the keys held (of one namespace), without those deleted while pinned."""
        with self._lock:
            return iter(self._index.listed(namespace))

    def clear(self, namespace: NamespaceId | None = None) -> int:
        """Delete every chunk (of one namespace) in one transaction, pinned ones at their last unpin.

        Returns:
            How many chunks were deleted or marked for deletion.

        Raises:
            DiskFull: LMDB could not commit the deletion; nothing changed.
        """
        return self._remove(list(self.keys(namespace)))

    def pin(self, key: ChunkKey) -> bool:
        """Count one pin on a present chunk, which is then never evicted; False if absent or deleted."""
        with self._lock:
            return self._index.pin(key)

    def unpin(self, key: ChunkKey) -> None:
        """Release one pin; the last pin of a chunk deleted while pinned removes it.

        Raises:
            LeaseError: the key holds no pin (a count never goes below zero).
        """
        with self._lock:
            last = self._index.unpin(key)
        if last:
            self._remove([key], doomed_only=True)

    def close(self) -> None:
        """Flush and close LMDB, record a clean shutdown, release the directory; idempotent."""
        with self._write_lock:
            env, self._env, self._records = self._env, None, None
            try:
                if env is not None:
                    env.sync(True)
                    env.close()
                    mark_closed(self.config.path)
            except (OSError, lmdb.Error) as exc:  # the next start treats it as not closed: safe
                log.warning("disk tier %s: unclean close: %s", self.name, exc)
            finally:
                if env is not None:
                    env.close()  # idempotent in py-lmdb
                if self._owner >= 0:
                    os.close(self._owner)
                    self._owner = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------
    def _rebuild(self, good: list[tuple[ChunkKey, RecordHeader]], bad: list[ChunkKey], wiped: bool,
                 t0: float) -> RebuildReport:
        """Index the scanned records, drop the bad ones, evict down to the budget."""
        with self._lock:
            for key, header in good:
                self._index.attach(key, ChunkMeta(header.namespace, header.payload_len, header.checksum))
            for key in bad:
                self._index.remember(key, MissReason.CORRUPT)
            over = self._index.choose_victims(None, 0, self._clock()) or []
            self._stats.evictions += len(over)
        with self._write_lock:
            try:
                self._commit_deletes(bad + [k for k, _ in over])
            except lmdb.Error as exc:
                raise DiskFull(errno.ENOSPC, f"no room to drop records at {self.config.path}: {exc}") from exc
        s = self._stats
        return RebuildReport(s.entries, s.used_bytes, len(bad), len(over), wiped, time.perf_counter() - t0)

    # -- LMDB transactions (call with self._write_lock held) ---------------------------
    def _open(self) -> Records:
        if self._records is None:
            raise KVStoreError(f"disk tier {self.name!r} is closed")
        return self._records

    def _put_locked(self, key: ChunkKey, payload: U8, stored: ChunkMeta) -> tuple[bool, Victims]:
        """put() with the write lock held: (stored, what was evicted)."""
        with self._lock:
            if self._index.holds(key, stored):
                self._index.touch(key, self._clock())
                return True, []
            victims = self._index.choose_victims(key, record_bytes(stored), self._clock())
            if victims is None:
                self._stats.rejected += 1
                return False, []
        header = RecordHeader(key, stored.namespace, payload.size, stored.checksum).pack()
        ok, evicted = self._write_record(key, header, payload, victims)
        with self._lock:
            if ok:
                self._index.attach(key, stored)
                self._stats.puts += 1
                self._stats.put_bytes += payload.size
            else:
                self._stats.rejected += 1
            self._stats.evictions += len(evicted)
        if ok:
            self.reserve.ensure()  # a no-op while held; else at most every few seconds
        return ok, evicted

    def _write_record(
        self, key: ChunkKey, header: bytes, payload: U8, victims: Victims
    ) -> tuple[bool, Victims]:
        """Commit the victims' deletion and the record; if full, evict more and retry; (ok, evicted)."""
        pending, evicted = victims, Victims()
        for attempt in range(_FULL_ROUNDS):
            try:
                self._open().commit([k for k, _ in pending], (key, header, payload))
                return True, evicted + pending
            except lmdb.Error as exc:
                if not is_full(exc):
                    log.error("disk tier %s: put failed: %s", self.name, exc)
                    break
                log.warning("disk tier %s: store full (%s), round %d", self.name, exc, attempt + 1)
            with self._lock:
                pending += self._index.evict_more(key, HEADER_BYTES + payload.size, self._clock())
            try:  # free pages become reusable two commits later: delete, then bump the epoch
                self._commit_deletes([k for k, _ in pending], use_reserve=False)
                evicted, pending = evicted + pending, Victims()
                self._open().bump_epoch()
            except lmdb.Error:
                break
        with self._lock:  # what was detached but is still on disk comes back
            for k, m in pending:
                self._index.attach(k, m)
        return False, evicted

    def _commit_deletes(self, keys: list[ChunkKey], use_reserve: bool = True) -> None:
        """Commit the deletion of ``keys``; on a full file system, once more after releasing the reserve.

        Evictions made by a put do not take the reserve (``use_reserve=False``):
        it is kept for DELETE, CLEAR and expiry, which must work on a full disk.
        """
        try:
            self._open().commit(keys, None)
        except lmdb.Error as exc:
            fs_full = is_full(exc) and not isinstance(exc, lmdb.MapFullError)
            if not (use_reserve and fs_full and self.reserve.release()):
                raise
            self._open().commit(keys, None)

    def _remove(self, keys: list[ChunkKey], doomed_only: bool = False) -> int:
        """Delete present keys, only marking pinned ones; returns how many."""
        with self._write_lock:
            with self._lock:
                present, removed = self._index.remove(keys, doomed_only)
            if not self._delete_records(removed):
                raise DiskFull(errno.ENOSPC, f"disk tier {self.name!r}: cannot commit a deletion")
        return present

    def _delete_records(self, victims: Victims) -> bool:
        """Commit the deletion of detached records; if it fails, they return to the index."""
        try:
            self._commit_deletes([k for k, _ in victims])
            return True
        except lmdb.Error as exc:
            log.error("disk tier %s: cannot delete %d records: %s", self.name, len(victims), exc)
            with self._lock:
                for k, m in victims:
                    self._index.attach(k, m)
            return False

    # -- reads ---------------------------------------------------------------------------
    def _get(self, key: ChunkKey, dst: U8) -> tuple[RecordHeader, float] | None:
        """Look up, copy and verify; count the hit or the miss. Returns the header and the cost."""
        with self._lock:
            expired = self._index.expire(None, self._clock())
            meta = self._index.meta(key)
            if meta is None or meta.nbytes > dst.size:
                reason = MissReason.TOO_SMALL if meta else self._index.gone_reason(key, MissReason.ABSENT)
                self._stats.miss(reason)
                meta = None
        if expired:
            self._delete_expired(expired)
        if meta is None:
            return None
        try:
            found = self._open().copy_verified(key, dst)
        except BadRecord as bad:
            log.warning("disk tier %s: corrupt record %s…: %s", self.name, key.hex()[:16], bad)
            self._drop_corrupt(key, bad.seen)
            return None
        with self._lock:
            if isinstance(found, MissReason):  # evicted, deleted or replaced since the lookup
                self._stats.miss(self._index.gone_reason(key, found))
                return None
            self._stats.hits += 1
            self._stats.hit_bytes += found.payload_len
            self._index.touch(key, self._clock())
        return found, meta.cost

    def _drop_corrupt(self, key: ChunkKey, seen: bytes | None) -> None:
        """Count a CORRUPT miss; delete the record unless a put replaced it since it was read."""
        with self._write_lock:
            deleted = False
            try:
                deleted = self._open().delete_if_unchanged(key, seen)
            except lmdb.Error as exc:
                log.error("disk tier %s: cannot delete a corrupt record: %s", self.name, exc)
            with self._lock:
                self._stats.miss(MissReason.CORRUPT)
                if deleted and self._index.meta(key) is not None:
                    self._index.detach(key, MissReason.CORRUPT)

    def _delete_expired(self, victims: Victims) -> None:
        with self._write_lock:
            if not self._delete_records(victims):
                return
            with self._lock:
                self._stats.evictions += len(victims)
        for k, m in victims:
            self._notify_evicted(k, m, None)

    def _check_put(self, key: ChunkKey, payload: U8, meta: ChunkMeta) -> ChunkMeta:
        if len(key) != KEY_BYTES:
            raise InvalidInput(f"chunk keys are {KEY_BYTES} bytes, got {len(key)}")
        if payload.size > self.config.max_chunk_bytes:
            limit = self.config.max_chunk_bytes
            raise ChunkTooLarge(f"chunk of {payload.size} bytes exceeds max_chunk_bytes {limit}")
        if meta.nbytes != payload.size:
            raise InvalidInput(f"meta.nbytes is {meta.nbytes} but the chunk has {payload.size} bytes")
        if meta.checksum and len(meta.checksum) != CHECKSUM_BYTES:
            raise InvalidInput(f"meta.checksum must be empty or {CHECKSUM_BYTES} bytes long")
        digest = meta.checksum or checksum(payload)  # a given checksum was made at the source: end to end
        return ChunkMeta(meta.namespace, payload.size, digest, meta.cost)


register_tier("disk", DiskTier)

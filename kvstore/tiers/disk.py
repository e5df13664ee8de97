"""The local disk tier: chunks in one LMDB environment, verified on every read.

Two named databases hold each chunk under its 32-byte key, both written in
one write transaction: ``hdr`` the 104-byte record header (tiers/record.py)
and ``data`` the payload. A restart rebuilds the in-memory index from the
headers alone; payload pages are not read until a chunk is. Layout, crash
safety, budget and measurements: docs/tiers.md ("Disk tier").
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Self

import lmdb
import numpy as np

from kvstore.buffers import U8, BufferLike, as_u8
from kvstore.checksum import CHECKSUM_BYTES, checksum, copy_with_checksum
from kvstore.errors import Busy, ChunkCorrupt, ChunkTooLarge, DiskFull, InvalidInput, KVStoreError, LeaseError
from kvstore.keys import KEY_BYTES, ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta, MissReason, Tier, register_tier
from kvstore.tiers.policies import make_policy, policy_names
from kvstore.tiers.record import HEADER_BYTES, RecordHeader

log = logging.getLogger(__name__)
Clock = Callable[[], float]
Victims = list[tuple[ChunkKey, ChunkMeta]]

_MIB = 1 << 20
_FULL_ROUNDS = 4  # write attempts of a put that finds the map or the filesystem full
_GONE_MEMORY = 65536  # keys whose miss reason (evicted, expired, corrupt) is remembered
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
_MAX_READERS = 512  # concurrent read transactions (one per reading thread)
_MARKER_BYTES = 96  # "open <boot id> <sync>" or "closed", space-padded


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
    """

    path: str
    capacity_bytes: int
    sync: Literal["none", "commit"] = "none"
    policy: str = "lru"
    ttl_s: float | None = None
    max_chunk_bytes: int = 256 * _MIB
    map_size_bytes: int | None = None

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

    @property
    def map_size(self) -> int:
        """Budget + 1/4 (page rounding, B-tree) + 4 largest records in flight + 4 MiB, in whole MiB."""
        record = min(self.max_chunk_bytes + HEADER_BYTES, self.capacity_bytes)
        want = self.map_size_bytes or self.capacity_bytes * 5 // 4 + 4 * record + 4 * _MIB
        return -(-want // _MIB) * _MIB


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What opening the store found: entries indexed, records dropped or evicted, time taken."""

    entries: int
    used_bytes: int
    dropped: int  # corrupt or orphaned records deleted
    evicted: int  # records evicted because the budget shrank
    wiped: bool  # emptied: it was open with sync="none" when the machine went down
    seconds: float


class _BadRecord(Exception):
    """A read found a corrupt record; ``seen`` is its raw header (None if missing)."""

    def __init__(self, reason: str, seen: bytes | None) -> None:
        super().__init__(reason)
        self.seen = seen


def _rec(meta: ChunkMeta) -> int:
    return HEADER_BYTES + meta.nbytes


def _is_full(exc: lmdb.Error) -> bool:
    return isinstance(exc, (lmdb.MapFullError, lmdb.DiskError)) or getattr(exc, "code", 0) in _FULL_ERRNOS


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


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
        the tier lock); reads copy from a read snapshot outside both locks.
    """

    kind = "disk"

    def __init__(self, config: DiskTierConfig, name: str = "disk", clock: Clock = time.monotonic) -> None:
        super().__init__(name, config.capacity_bytes)
        self.config = config
        self._clock = clock
        self._policy = make_policy(config.policy, config.ttl_s)
        self._index: dict[ChunkKey, ChunkMeta] = {}
        self._pins: dict[ChunkKey, int] = {}
        self._doomed: set[ChunkKey] = set()  # deleted while pinned
        self._gone: OrderedDict[ChunkKey, MissReason] = OrderedDict()
        self._write_lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        os.makedirs(config.path, exist_ok=True)
        self._owner = self._take_ownership()
        try:
            wiped = self._wipe_if_unsafe()
            t0 = time.perf_counter()
            good, bad = self._scan()
            self._env = self._open_env()
            self._hdr = self._env.open_db(b"hdr")
            self._data = self._env.open_db(b"data")
            self._epoch_db = self._env.open_db(b"epoch")
            self.last_rebuild = self._rebuild(good, bad, wiped, t0)
            self._mark_session(f"open {_boot_id()} {config.sync}")
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
            with self._lock:
                old = self._index.get(key)
                if old is not None and key not in self._doomed and old.checksum == stored.checksum \
                        and old.nbytes == stored.nbytes:
                    self._policy.touch(key, self._clock())
                    return True
                victims = self._choose_victims(key, _rec(stored), self._clock())
                if victims is None:
                    self._stats.rejected += 1
                    return False
            header = RecordHeader(key, meta.namespace, payload.size, stored.checksum).pack()
            ok, evicted = self._write_record(key, header, payload, victims)
            with self._lock:
                if ok:
                    self._attach(key, stored)
                    self._stats.puts += 1
                    self._stats.put_bytes += payload.size
                else:
                    self._stats.rejected += 1
                self._stats.evictions += len(evicted)
        for k, m in evicted:
            self._notify_evicted(k, m, None)
        return ok

    def get_into(self, key: ChunkKey, out: BufferLike) -> int | None:
        """Copy the verified chunk into ``out[:n]``.

        Returns:
            n, or None on a miss (absent, evicted, expired, corrupt, ``out`` too
            small), counted by reason. After a corrupt miss ``out[:n]`` is zeroed.

        Raises:
            InvalidInput: ``out`` is not a writable contiguous CPU buffer.
        """
        found = self._get(key, as_u8(out, writable=True))
        return None if found is None else found[0].payload_len

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
            return self._index.get(key)

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
            return iter([k for k, m in self._index.items()
                         if k not in self._doomed and namespace in (None, m.namespace)])

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
            if key not in self._index or key in self._doomed:
                return False
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: ChunkKey) -> None:
        """Release one pin; the last pin of a chunk deleted while pinned removes it.

        Raises:
            LeaseError: the key holds no pin (a count never goes below zero).
        """
        with self._lock:
            count = self._pins.get(key, 0)
            if count == 0:
                raise LeaseError(f"unpin of a chunk that tier {self.name!r} does not hold pinned")
            if count > 1:
                self._pins[key] = count - 1
                return
            del self._pins[key]
            if key not in self._doomed:
                return
        self._remove([key], doomed_only=True)

    def close(self) -> None:
        """Flush and close LMDB, record a clean shutdown, release the directory; idempotent."""
        with self._write_lock:
            env, self._env = self._env, None
            try:
                if env is not None:
                    env.sync(True)
                    env.close()
                    self._mark_session("closed")
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
    def _take_ownership(self) -> int:
        fd = os.open(os.path.join(self.config.path, "owner.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"disk tier directory {self.config.path!r} is open in another process") from None
        return fd

    def _wipe_if_unsafe(self) -> bool:
        """Empty the store if it was open with sync='none' when the machine went down (boot id changed)."""
        try:
            with open(os.path.join(self.config.path, "session"), encoding="ascii") as f:
                state = f.read().split()
        except OSError:
            return False
        boot = _boot_id()
        if not (len(state) == 3 and state[0] == "open" and state[2] == "none" and boot and state[1] != boot):
            return False
        log.warning("disk tier %s was open without fsync across a reboot; starting empty", self.config.path)
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.unlink(os.path.join(self.config.path, name))
            except FileNotFoundError:
                pass
        return True

    def _mark_session(self, state: str) -> None:
        """Overwrite the fixed-size session marker in place (no new blocks: it works on a full disk)."""
        fd = os.open(os.path.join(self.config.path, "session"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, state.ljust(_MARKER_BYTES - 1).encode("ascii")[: _MARKER_BYTES - 1] + b"\n", 0)
        finally:
            os.close(fd)

    def _open_env(self) -> lmdb.Environment:
        cfg, writemap = self.config, self.config.sync == "none"
        try:
            env = lmdb.open(cfg.path, map_size=cfg.map_size, max_dbs=3, sync=cfg.sync == "commit",
                            writemap=writemap, meminit=False, max_readers=_MAX_READERS)
        except lmdb.Error as exc:
            if _is_full(exc):
                raise DiskFull(errno.ENOSPC, f"no room to open the disk tier at {cfg.path}: {exc}") from exc
            msg = f"cannot open the LMDB store at {cfg.path} (delete it to start empty): {exc}"
            raise ChunkCorrupt(msg) from exc
        if writemap:  # reserve the whole map: a write fault on a hole of a full disk would be a SIGBUS
            fd = os.open(os.path.join(cfg.path, "data.mdb"), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, env.info()["map_size"])
            except OSError as exc:
                env.close()
                raise DiskFull(exc.errno, f"cannot reserve {cfg.map_size} bytes under {cfg.path}") from exc
            finally:
                os.close(fd)
        return env

    def _rebuild(self, good: list[tuple[ChunkKey, RecordHeader]], bad: list[ChunkKey], wiped: bool,
                 t0: float) -> RebuildReport:
        """Index the scanned records, drop the bad ones, evict down to the budget."""
        with self._lock:
            for key, header in good:
                self._attach(key, ChunkMeta(header.namespace, header.payload_len, header.checksum))
            for key in bad:
                self._remember(key, MissReason.CORRUPT)
            over = self._choose_victims(None, 0, self._clock()) or []
            self._stats.evictions += len(over)
        with self._write_lock:
            try:
                self._commit(bad + [k for k, _ in over], None)
            except lmdb.Error as exc:
                raise DiskFull(errno.ENOSPC, f"no room to drop records at {self.config.path}: {exc}") from exc
        s = self._stats
        return RebuildReport(s.entries, s.used_bytes, len(bad), len(over), wiped, time.perf_counter() - t0)

    def _scan(self) -> tuple[list[tuple[ChunkKey, RecordHeader]], list[ChunkKey]]:
        """Read every header through a read-only map without readahead, so payload pages stay on disk.

        Only if the two databases disagree in their counts are the payload keys
        walked too (one page per payload) to find records missing a half.
        """
        if not os.path.exists(os.path.join(self.config.path, "data.mdb")):
            return [], []
        good: list[tuple[ChunkKey, RecordHeader]] = []
        bad: list[ChunkKey] = []
        cfg = self.config
        env = lmdb.open(cfg.path, map_size=cfg.map_size, max_dbs=3, max_readers=_MAX_READERS, readonly=True,
                        readahead=False)
        try:
            with env.begin(buffers=True) as txn:
                try:
                    hdr, data = (env.open_db(name, txn=txn, create=False) for name in (b"hdr", b"data"))
                except lmdb.NotFoundError:
                    return [], []
                for raw_key, raw in txn.cursor(db=hdr):
                    key = ChunkKey(bytes(raw_key))
                    try:
                        good.append((key, RecordHeader.unpack(raw, key)))
                    except ChunkCorrupt:
                        bad.append(key)
                if txn.stat(hdr)["entries"] != txn.stat(data)["entries"]:
                    payloads = {bytes(k) for k in txn.cursor(db=data).iternext(keys=True, values=False)}
                    bad += [ChunkKey(k) for k in payloads.difference(k for k, _ in good).difference(bad)]
                    bad += [k for k, _ in good if k not in payloads]
                    good = [(k, h) for k, h in good if k in payloads]
        finally:
            env.close()
        return good, bad

    # -- index (call with self._lock held) ----------------------------------------------
    def _attach(self, key: ChunkKey, meta: ChunkMeta) -> None:
        old = self._index.get(key)
        self._index[key] = meta
        self._stats.used_bytes += _rec(meta) - (_rec(old) if old else 0)
        self._stats.entries = len(self._index)
        self._policy.admit(key, meta.nbytes, meta.cost, self._clock())
        self._gone.pop(key, None)
        self._doomed.discard(key)

    def _detach(self, key: ChunkKey, reason: MissReason | None) -> ChunkMeta:
        meta = self._index.pop(key)
        self._stats.used_bytes -= _rec(meta)
        self._stats.entries = len(self._index)
        self._policy.remove(key)
        self._doomed.discard(key)
        if reason is None:
            self._gone.pop(key, None)
        else:
            self._remember(key, reason)
        return meta

    def _remember(self, key: ChunkKey, reason: MissReason) -> None:
        self._gone[key] = reason
        self._gone.move_to_end(key)
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def _expire(self, keep: ChunkKey | None, now: float) -> Victims:
        return [(k, self._detach(k, MissReason.EXPIRED)) for k in self._policy.expired(now)
                if k != keep and k not in self._pins and k in self._index]

    def _choose_victims(self, key: ChunkKey | None, rec: int, now: float) -> Victims | None:
        """Detach expired chunks, then policy victims until ``rec`` bytes fit; None if they never can."""
        pinned = sum(_rec(self._index[k]) for k in self._pins if k != key and k in self._index)
        if rec + pinned > self.capacity_bytes:
            return None
        victims = self._expire(key, now)
        old = self._index.get(key) if key is not None else None
        free = self.capacity_bytes - self._stats.used_bytes + (_rec(old) if old else 0)
        if free < rec:
            victims += self._evict_more(key, rec - free, now)
            if self.capacity_bytes - self._stats.used_bytes + (_rec(old) if old else 0) < rec:
                raise KVStoreError(f"tier {self.name!r}: eviction policy ran out of victims")  # unreachable
        return victims

    def _evict_more(self, key: ChunkKey | None, nbytes: int, now: float) -> Victims:
        """Detach unpinned policy victims (never ``key``) worth at least ``nbytes``, or all there are."""
        victims: Victims = []
        while nbytes > 0:
            victim = self._policy.victim(lambda k: k == key or k in self._pins, now)
            if victim is None:
                break
            victims.append((victim, self._detach(victim, MissReason.EVICTED)))
            nbytes -= _rec(victims[-1][1])
        return victims

    # -- LMDB transactions (call with self._write_lock held) ---------------------------
    def _open(self) -> lmdb.Environment:
        if self._env is None:
            raise KVStoreError(f"disk tier {self.name!r} is closed")
        return self._env

    def _commit(self, deletes: list[ChunkKey], put: tuple[ChunkKey, bytes, U8] | None) -> None:
        """One write transaction: delete records, then put one; all or nothing."""
        with self._open().begin(write=True) as txn:
            for k in deletes:
                txn.delete(k, db=self._hdr)
                txn.delete(k, db=self._data)
            if put is not None:
                txn.put(put[0], put[1], db=self._hdr)
                txn.put(put[0], put[2].data, db=self._data)

    def _write_record(
        self, key: ChunkKey, header: bytes, payload: U8, victims: Victims
    ) -> tuple[bool, Victims]:
        """Commit the victims' deletion and the record; if full, evict more and retry; (ok, evicted)."""
        pending, evicted = victims, Victims()
        for attempt in range(_FULL_ROUNDS):
            try:
                self._commit([k for k, _ in pending], (key, header, payload))
                return True, evicted + pending
            except lmdb.Error as exc:
                if not _is_full(exc):
                    log.error("disk tier %s: put failed: %s", self.name, exc)
                    break
                log.warning("disk tier %s: store full (%s), round %d", self.name, exc, attempt + 1)
            with self._lock:
                pending += self._evict_more(key, HEADER_BYTES + payload.size, self._clock())
            try:  # free pages become reusable two commits later: delete, then bump the epoch
                self._commit([k for k, _ in pending], None)
                evicted, pending = evicted + pending, Victims()
                self._bump_epoch()
            except lmdb.Error:
                break
        with self._lock:  # what was detached but is still on disk comes back
            for k, m in pending:
                self._attach(k, m)
        return False, evicted

    def _bump_epoch(self) -> None:
        with self._open().begin(write=True) as txn:
            epoch = int.from_bytes(txn.get(b"epoch", b"", db=self._epoch_db), "little")
            txn.put(b"epoch", (epoch + 1).to_bytes(8, "little"), db=self._epoch_db)

    def _remove(self, keys: list[ChunkKey], doomed_only: bool = False) -> int:
        """Delete present keys, only marking pinned ones; returns how many."""
        with self._write_lock:
            with self._lock:
                present = [k for k in keys if k in self._index and not (k in self._doomed and k in self._pins)
                           and (k in self._doomed or not doomed_only)]
                removed = [(k, self._detach(k, None)) for k in present if k not in self._pins]
                self._doomed.update(k for k in present if k in self._pins)
            if not self._delete_records(removed):
                raise DiskFull(errno.ENOSPC, f"disk tier {self.name!r}: cannot commit a deletion")
        return len(present)

    def _delete_records(self, victims: Victims) -> bool:
        """Commit the deletion of detached records; if it fails, they return to the index."""
        try:
            self._commit([k for k, _ in victims], None)
            return True
        except lmdb.Error as exc:
            log.error("disk tier %s: cannot delete %d records: %s", self.name, len(victims), exc)
            with self._lock:
                for k, m in victims:
                    self._attach(k, m)
            return False

    # -- reads ---------------------------------------------------------------------------
    def _get(self, key: ChunkKey, dst: U8) -> tuple[RecordHeader, float] | None:
        """Look up, copy and verify; count the hit or the miss. Returns the header and the cost."""
        with self._lock:
            expired = self._expire(None, self._clock())
            meta = self._index.get(key)
            if meta is None or meta.nbytes > dst.size:
                self._stats.miss(MissReason.TOO_SMALL if meta else self._gone.get(key, MissReason.ABSENT))
                meta = None
        if expired:
            self._delete_expired(expired)
        if meta is None:
            return None
        try:
            found = self._copy_verified(key, dst)
        except _BadRecord as bad:
            log.warning("disk tier %s: corrupt record %s…: %s", self.name, key.hex()[:16], bad)
            self._drop_corrupt(key, bad.seen)
            return None
        with self._lock:
            if isinstance(found, MissReason):  # evicted, deleted or replaced since the lookup
                self._stats.miss(self._gone.get(key, found))
                return None
            self._stats.hits += 1
            self._stats.hit_bytes += found.payload_len
            self._policy.touch(key, self._clock())
        return found, meta.cost

    def _copy_verified(self, key: ChunkKey, dst: U8) -> RecordHeader | MissReason:
        """Copy the payload straight from the map into ``dst`` and verify it."""
        with self._open().begin(buffers=True) as txn:
            raw, payload = txn.get(key, db=self._hdr), txn.get(key, db=self._data)
            seen = None if raw is None else bytes(raw)
            if raw is None and payload is None:
                return MissReason.ABSENT
            if raw is None or payload is None:
                raise _BadRecord("header or payload missing", seen)
            try:
                header = RecordHeader.unpack(raw, key)
            except ChunkCorrupt as exc:
                raise _BadRecord(str(exc), seen) from None
            n = header.payload_len
            if len(payload) != n:
                raise _BadRecord(f"payload is {len(payload)} bytes, the header says {n}", seen)
            if n > dst.size:
                return MissReason.TOO_SMALL
            digest = copy_with_checksum(np.frombuffer(payload, dtype=np.uint8), dst[:n])
        if digest != header.checksum:
            dst[:n] = 0  # never leave bad bytes in the caller's buffer
            raise _BadRecord("payload checksum mismatch", seen)
        return header

    def _drop_corrupt(self, key: ChunkKey, seen: bytes | None) -> None:
        """Count a CORRUPT miss; delete the record unless a put replaced it since it was read."""
        with self._write_lock:
            deleted = False
            try:
                with self._open().begin(write=True) as txn:
                    if txn.get(key, db=self._hdr) == seen:
                        deleted = txn.delete(key, db=self._hdr) | txn.delete(key, db=self._data)
            except lmdb.Error as exc:
                log.error("disk tier %s: cannot delete a corrupt record: %s", self.name, exc)
            with self._lock:
                self._stats.miss(MissReason.CORRUPT)
                if deleted and key in self._index:
                    self._detach(key, MissReason.CORRUPT)

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

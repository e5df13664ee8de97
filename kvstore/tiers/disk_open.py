"""Opening the disk tier's directory: ownership, session marker, map reservation, header scan.

A directory belongs to one process at a time (``owner.lock``, an flock). The
``session`` file says whether the store was closed cleanly; one left open
with ``sync="none"`` across a reboot (the boot id changed) may have lost
pages that were never written back, so it is emptied. The headers are then
scanned through a read-only map without readahead, so a restart reads the
headers alone and payload pages stay on disk until a chunk is read.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass

import lmdb

from kvstore.errors import Busy, ChunkCorrupt, DiskFull
from kvstore.keys import ChunkKey
from kvstore.tiers.disk_config import DiskTierConfig
from kvstore.tiers.record import RecordHeader

log = logging.getLogger("kvstore.tiers.disk")  # the tier's logger: one name for all of its messages

MAX_READERS = 512  # concurrent read transactions (one per reading thread)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
_MARKER_BYTES = 96  # "open <boot id> <sync>" or "closed", space-padded

Scanned = tuple[list[tuple[ChunkKey, RecordHeader]], list[ChunkKey]]
"""The records whose header is good, and the keys of the bad ones."""


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What opening the store found: entries indexed, records dropped or evicted, time taken."""

    entries: int
    used_bytes: int
    dropped: int  # corrupt or orphaned records deleted
    evicted: int  # records evicted because the budget shrank
    wiped: bool  # emptied: it was open with sync="none" when the machine went down
    seconds: float


def is_full(exc: lmdb.Error) -> bool:
    """Whether an LMDB error means the map or the filesystem is full."""
    return isinstance(exc, (lmdb.MapFullError, lmdb.DiskError)) or getattr(exc, "code", 0) in _FULL_ERRNOS


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def take_ownership(path: str) -> int:
    """Lock the directory for this process; returns the lock's fd (close it to release).

    Raises:
        Busy: another process holds the directory.
    """
    fd = os.open(os.path.join(path, "owner.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"disk tier directory {path!r} is open in another process") from None
    return fd


def wipe_if_unsafe(path: str) -> bool:
    """Empty the store if it was open with sync='none' when the machine went down (boot id changed)."""
    try:
        with open(os.path.join(path, "session"), encoding="ascii") as f:
            state = f.read().split()
    except OSError:
        return False
    boot = _boot_id()
    if not (len(state) == 3 and state[0] == "open" and state[2] == "none" and boot and state[1] != boot):
        return False
    log.warning("disk tier %s was open without fsync across a reboot; starting empty", path)
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return True


def mark_open(path: str, sync: str) -> None:
    """Record an open session: this boot's id and the sync mode."""
    _mark_session(path, f"open {_boot_id()} {sync}")


def mark_closed(path: str) -> None:
    """Record a clean close."""
    _mark_session(path, "closed")


def _mark_session(path: str, state: str) -> None:
    """Overwrite the fixed-size session marker in place (no new blocks: it works on a full disk)."""
    fd = os.open(os.path.join(path, "session"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, state.ljust(_MARKER_BYTES - 1).encode("ascii")[: _MARKER_BYTES - 1] + b"\n", 0)
    finally:
        os.close(fd)


def open_env(cfg: DiskTierConfig) -> lmdb.Environment:
    """Open the LMDB environment; with sync='none' the whole map is reserved on disk first.

    Raises:
        DiskFull: no room to open or to reserve the map.
        ChunkCorrupt: LMDB cannot open the files.
    """
    writemap = cfg.sync == "none"
    try:
        env = lmdb.open(cfg.path, map_size=cfg.map_size, max_dbs=3, sync=cfg.sync == "commit",
                        writemap=writemap, meminit=False, max_readers=MAX_READERS)
    except lmdb.Error as exc:
        if is_full(exc):
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


def scan_headers(cfg: DiskTierConfig) -> Scanned:
    """Read every header through a read-only map without readahead, so payload pages stay on disk.

    Only if the two databases disagree in their counts are the payload keys
    walked too (one page per payload) to find records missing a half.
    """
    if not os.path.exists(os.path.join(cfg.path, "data.mdb")):
        return [], []
    good: list[tuple[ChunkKey, RecordHeader]] = []
    bad: list[ChunkKey] = []
    env = lmdb.open(cfg.path, map_size=cfg.map_size, max_dbs=3, max_readers=MAX_READERS, readonly=True,
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

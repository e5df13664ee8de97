"""The disk tier's records in LMDB: the header in ``hdr`` and the payload in ``data``, under one key.

Layout and crash safety: docs/tiers.md ("Disk tier").
"""

from __future__ import annotations

import lmdb
import numpy as np

from kvstore.buffers import U8
from kvstore.checksum import copy_with_checksum
from kvstore.errors import ChunkCorrupt
from kvstore.keys import ChunkKey
from kvstore.tiers.base import MissReason
from kvstore.tiers.record import RecordHeader


class BadRecord(Exception):
    """A read found a corrupt record; ``seen`` is its raw header (None if missing)."""

    def __init__(self, reason: str, seen: bytes | None) -> None:
        super().__init__(reason)
        self.seen = seen


class Records:
    """The named databases of an open environment and the transactions on them.

    Invariants:
      * a record's header and payload are put and deleted in one write
        transaction, so a killed writer leaves the old state or the new one;
      * bytes are copied out only after the header names the key asked for
        and the lengths match, and are zeroed if the copy's XXH3-128 differs
        from the header's.

    The environment belongs to the tier, which closes it. Write transactions
    must not overlap: callers hold the tier's write lock around them.
    """

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self._hdr = env.open_db(b"hdr")
        self._data = env.open_db(b"data")
        self._epoch = env.open_db(b"epoch")

    def commit(self, deletes: list[ChunkKey], put: tuple[ChunkKey, bytes, U8] | None) -> None:
        """One write transaction: delete records, then put one; all or nothing.

        Deletions go in key order, one database after the other: each leaf is
        copied once, emptied and its copy reused for the next, so deleting
        many records needs few new pages (what matters on a full disk).
        """
        order = sorted(deletes)
        with self.env.begin(write=True) as txn:
            for db in (self._hdr, self._data):
                for k in order:
                    txn.delete(k, db=db)
            if put is not None:
                txn.put(put[0], put[1], db=self._hdr)
                txn.put(put[0], put[2].data, db=self._data)

    def bump_epoch(self) -> None:
        """A write that makes the pages freed two commits ago reusable."""
        with self.env.begin(write=True) as txn:
            epoch = int.from_bytes(txn.get(b"epoch", b"", db=self._epoch), "little")
            txn.put(b"epoch", (epoch + 1).to_bytes(8, "little"), db=self._epoch)

    def copy_verified(self, key: ChunkKey, dst: U8) -> RecordHeader | MissReason:
        """Copy the payload straight from the map into ``dst`` and verify it.

        Returns:
            The header, or ABSENT (no record) or TOO_SMALL (``dst`` is).

        Raises:
            BadRecord: a half is missing, the header is bad or names another
                key, or the length or the checksum does not match.
        """
        with self.env.begin(buffers=True) as txn:
            raw, payload = txn.get(key, db=self._hdr), txn.get(key, db=self._data)
            seen = None if raw is None else bytes(raw)
            if raw is None and payload is None:
                return MissReason.ABSENT
            if raw is None or payload is None:
                raise BadRecord("header or payload missing", seen)
            try:
                header = RecordHeader.unpack(raw, key)
            except ChunkCorrupt as exc:
                raise BadRecord(str(exc), seen) from None
            n = header.payload_len
            if len(payload) != n:
                raise BadRecord(f"payload is {len(payload)} bytes, the header says {n}", seen)
            if n > dst.size:
                return MissReason.TOO_SMALL
            digest = copy_with_checksum(np.frombuffer(payload, dtype=np.uint8), dst[:n])
        if digest != header.checksum:
            dst[:n] = 0  # never leave bad bytes in the caller's buffer
            raise BadRecord("payload checksum mismatch", seen)
        return header

    def delete_if_unchanged(self, key: ChunkKey, seen: bytes | None) -> bool:
        """Delete the record if its raw header is still ``seen``; True if something was deleted."""
        with self.env.begin(write=True) as txn:
            if txn.get(key, db=self._hdr) == seen:
                return bool(txn.delete(key, db=self._hdr) | txn.delete(key, db=self._data))
        return False

"""``kvstore inspect KEY``: the record a tier holds under a chunk key, read where it lies.

A chunk on the disk tier (an LMDB directory, read-only, so a running daemon
may keep writing it) or on the remote tier (Redis/Valkey) is a record: the
104-byte header of kvstore.tiers.record, then the payload, which is either
the raw chunk or a codec container. This reads the record without trusting
it, checks the header and the payload's XXH3-128, and, for a container,
describes it as ``kvstore inspect FILE`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lmdb
import xxhash

from kvstore.codecs.container import MAGIC
from kvstore.codecs.inspect import Description, inspect_container
from kvstore.errors import ChunkCorrupt, CodecError, InvalidInput
from kvstore.keys import KEY_BYTES, ChunkKey
from kvstore.tiers.record import HEADER_BYTES, RecordHeader

MAX_RECORD_BYTES = (1 << 31) + (1 << 24)


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """One tier's record of a key."""

    source: str
    header_ok: bool
    namespace: str | None
    payload_bytes: int
    checksum_ok: bool
    problem: str | None
    container: Description | None
    container_error: str | None

    @property
    def intact(self) -> bool:
        return self.header_ok and self.checksum_ok and self.container_error is None and (
            self.container is None or self.container.checksums_ok
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "header_ok": self.header_ok, "namespace": self.namespace,
            "payload_bytes": self.payload_bytes, "checksum_ok": self.checksum_ok, "problem": self.problem,
            "payload": "container" if self.container is not None or self.container_error else "raw chunk",
            "container": None if self.container is None else self.container.to_dict(),
            "container_error": self.container_error, "intact": self.intact,
        }  # fmt: skip


def parse_key(text: str) -> ChunkKey:
    """A chunk key from its 64 hex digits.

    Raises:
        InvalidInput: not 64 hex digits.
    """
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise InvalidInput(f"a chunk key is {2 * KEY_BYTES} hex digits, got {text!r}")
    return ChunkKey(raw)


def describe_record(
    source: str, key: ChunkKey, header: bytes | None, payload: bytes | None, decode: bool = False
) -> RecordInfo:
    """Check a record's two halves and describe its payload (decoding a container if asked)."""
    if header is None:
        return RecordInfo(source, False, None, len(payload or b""), False, "no header", None, None)
    try:
        h = RecordHeader.unpack(header, key)
    except ChunkCorrupt as exc:
        return RecordInfo(source, False, None, len(payload or b""), False, str(exc), None, None)
    ns = bytes(h.namespace).hex()
    if payload is None:
        return RecordInfo(source, True, ns, 0, False, "no payload", None, None)
    problem = None
    if len(payload) != h.payload_len:
        problem = f"payload is {len(payload)} bytes, the header says {h.payload_len}"
    checksum_ok = problem is None and xxhash.xxh3_128_digest(payload) == h.checksum
    if problem is None and not checksum_ok:
        problem = "payload checksum mismatch"
    container = container_error = None
    if payload[: len(MAGIC)] == MAGIC:
        try:
            container = inspect_container(payload, decode=decode)
        except CodecError as exc:
            container_error = str(exc)
    return RecordInfo(source, True, ns, len(payload), checksum_ok, problem, container, container_error)


def read_disk(data_dir: str, key: ChunkKey, decode: bool = False) -> RecordInfo | None:
    """The disk tier's record of ``key`` under ``data_dir`` (opened read-only); None if absent.

    Raises:
        InvalidInput: ``data_dir`` holds no disk tier.
    """
    if not os.path.exists(os.path.join(data_dir, "data.mdb")):
        raise InvalidInput(f"{data_dir} holds no disk tier (no data.mdb)")
    try:
        env = lmdb.open(data_dir, readonly=True, lock=True, max_dbs=3, subdir=True, create=False)
    except lmdb.Error as exc:
        raise InvalidInput(f"cannot open the disk tier at {data_dir}: {exc}") from exc
    try:
        hdr_db, data_db = env.open_db(b"hdr", create=False), env.open_db(b"data", create=False)
        with env.begin() as txn:
            header, payload = txn.get(bytes(key), db=hdr_db), txn.get(bytes(key), db=data_db)
    except lmdb.Error as exc:
        raise InvalidInput(f"the disk tier at {data_dir} is unreadable: {exc}") from exc
    finally:
        env.close()
    if header is None and payload is None:
        return None
    return describe_record(f"disk {data_dir}", key, header, payload, decode)


def read_remote(url: str, key: ChunkKey, key_prefix: str = "kvs:", decode: bool = False) -> RecordInfo | None:
    """The remote tier's record of ``key`` in the Redis at ``url``; None if absent."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        rkey = key_prefix.encode() + key.hex().encode()
        length = int(client.strlen(rkey))
        if length == 0:
            return None
        if length > MAX_RECORD_BYTES:
            return RecordInfo(f"redis {url}", False, None, length, False, "larger than any record", None, None)
        raw = client.get(rkey)
    except redis.RedisError as exc:
        raise InvalidInput(f"cannot read {url}: {exc}") from exc
    finally:
        client.close()
    if not isinstance(raw, bytes):
        return None
    return describe_record(f"redis {url}", key, raw[:HEADER_BYTES], raw[HEADER_BYTES:], decode)


def format_record(r: RecordInfo) -> str:
    lines = [f"== {r.source}"]
    if not r.header_ok:
        lines.append(f"record     CORRUPT: {r.problem}")
        return "\n".join(lines)
    lines.append(f"namespace  {r.namespace}")
    kind = "container" if r.container is not None or r.container_error else "raw chunk"
    check = "ok" if r.checksum_ok else f"BAD ({r.problem})"
    lines.append(f"payload    {r.payload_bytes} bytes, {kind}, checksum {check}")
    if r.container_error:
        lines.append(f"container  INVALID: {r.container_error}")
    return "\n".join(lines)

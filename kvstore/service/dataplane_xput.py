"""XPUT's per-chunk checks: a chunk as it travelled becomes raw KV or a container stored as is.

See :func:`kvstore.service.dataplane_put.xput` and docs/protocol.md (XPUT).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.checksum import checksum
from kvstore.codecs.container import unpack
from kvstore.errors import ChunkCorrupt, InvalidInput
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.dataplane_store import StoreAccess

U8Array = np.ndarray[Any, np.dtype[np.uint8]]


@dataclass(frozen=True, slots=True)
class XPutRequest:
    """An XPUT's validated header: per chunk its wire size, wire checksum, codec and raw checksum."""

    ns: Namespace
    keys: list[ChunkKey]
    sizes: list[int]
    checksums: list[bytes]
    codecs: list[str]
    raw_checksums: list[bytes | None]
    cost: float


@dataclass(frozen=True, slots=True)
class _Checked:
    """One XPUT chunk after its checks: raw KV (``tier`` None) or a container for ``tier``."""

    data: U8Array
    tier: str | None


def checked(access: StoreAccess, req: XPutRequest, i: int, part: U8Array) -> _Checked:
    """Chunk ``i`` checked (see :func:`xput`): a container an encoded tier stores as is, or raw KV."""
    ns, codec = req.ns, req.codecs[i]
    if codec == "raw":
        return _Checked(_as_sent(req, i, whole_tokens(ns, i, part)), None)
    container = unpack(part)  # every section checked against its own checksum
    if container.codec != codec:
        raise InvalidInput(f"chunk {i} is a {container.codec!r} container, the header says {codec!r}")
    if container.spec != ns.spec:
        raise InvalidInput(
            f"chunk {i} holds KV of another spec ({container.spec.model.name}, {container.spec.dtype}, "
            f"{container.spec.num_layers} layers) than the namespace's ({ns.spec.model.name}, "
            f"{ns.spec.dtype}, {ns.spec.num_layers} layers); nothing was stored"
        )
    tier = access.store.encoded.tier_for(ns, container)
    if tier is not None and access.owner(req.keys[i], local_only=True) is None:
        return _Checked(part, tier)
    return _Checked(decoded(access, req, i, part, container.layout.nbytes), None)


def decoded(access: StoreAccess, req: XPutRequest, i: int, part: U8Array,
            nbytes: int | None = None) -> Any:
    """Decode chunk ``i``'s (checked) container into raw KV and check it."""
    raw = np.empty(nbytes if nbytes is not None else unpack(part, verify=False).layout.nbytes, dtype=np.uint8)
    access.store.codecs.decode_into(req.ns, part, raw)
    return _as_sent(req, i, whole_tokens(req.ns, i, raw))


def _as_sent(req: XPutRequest, i: int, raw: U8Array) -> U8Array:
    """``raw`` checked against the raw checksum the sender gave, if any."""
    want = req.raw_checksums[i]
    if want is not None and checksum(raw) != want:
        raise ChunkCorrupt(f"chunk {i} decoded to bytes that fail the sender's checksum; nothing was stored")
    return raw


def whole_tokens(ns: Namespace, i: int, raw: U8Array) -> Any:
    if raw.size % ns.spec.bytes_per_token or raw.size == 0:
        raise InvalidInput(
            f"chunk {i} decodes to {raw.size} bytes, not a whole number of tokens "
            f"({ns.spec.bytes_per_token} bytes each) of the namespace's KV"
        )
    return raw


@dataclass(frozen=True, slots=True)
class XPutStored:
    """What storing an XPUT's checked chunks did: per chunk stored and stored as sent (encoded), and
    the seconds spent decoding (a container its tier could not take) and storing."""

    stored: list[bool]
    encoded: list[bool]
    decode_s: float
    store_s: float

    def reply(self, check_s: float) -> dict[str, Any]:
        """XPUT's reply; ``decode_s`` adds the checks and decoding before storing (``check_s``)."""
        return {"stored": self.stored, "encoded": self.encoded, "decode_s": check_s + self.decode_s,
                "store_s": self.store_s}  # fmt: skip


def store_checked(access: StoreAccess, req: XPutRequest, ready: Sequence[_Checked]) -> XPutStored:
    """Store every checked chunk: a container in its tier as it is (decoded and stored raw if the tier
    could not take it), raw KV in the store. ``store_s`` is the time of the stores themselves (the
    top tier's copy, a container's write to its tier), ``decode_s`` that of any decoding here."""
    stored, encoded, decode_s, store_s = [], [], 0.0, 0.0
    for i, (key, chunk) in enumerate(zip(req.keys, ready)):
        t0 = time.perf_counter()
        ok = chunk.tier is not None and put_encoded(access, req, i, chunk)
        raw = chunk.data
        t1 = time.perf_counter()
        if chunk.tier is not None and not ok:  # the tier could not take it: decode, store raw
            raw = decoded(access, req, i, chunk.data)
        t2 = time.perf_counter()
        stored.append(ok or access.put_copy(req.ns, key, raw, req.cost))
        encoded.append(ok)
        decode_s += t2 - t1
        store_s += (t1 - t0) + (time.perf_counter() - t2)
    return XPutStored(stored, encoded, decode_s, store_s)


def put_encoded(access: StoreAccess, req: XPutRequest, i: int, chunk: _Checked) -> bool:
    """Store a checked container in its tier as it is; False if the tier could not take it."""
    assert chunk.tier is not None  # callers pass containers for a tier only
    return access.store.encoded.put(req.ns, req.keys[i], chunk.tier, chunk.data, req.checksums[i],
                                    req.raw_checksums[i], req.cost)


def stores_of(access: StoreAccess, ns: Namespace) -> list[dict[str, Any]]:
    """``{codec, params}`` that each encoded tier below the top writes for a full chunk of ``ns``."""
    out = []
    for tier in access.store.tiers[1:]:
        written = access.store.encoded.written_params(ns, tier.name, ns.chunk_tokens)
        if written is not None:
            out.append({"codec": written[0], "params": written[1]})
    return out

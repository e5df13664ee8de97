"""Chunks that arrive encoded: a verified container goes as it is into the tier whose codec writes it.

A daemon receiving a codec container (a transfer's XPUT, docs/protocol.md)
that one of the namespace's encoded tiers would have written the same way
(the same codec and the same container params, profile included) can store
those bytes in that tier without decoding them: a read then decodes from
that tier and promotes the chunk, like any chunk the background writer
encoded there. Which params a tier's codec writes is learnt by encoding one
probe chunk of zeros per (namespace, tier, codec choice, tokens), once.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from kvstore.buffers import U8
from kvstore.checksum import checksum
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.container import Container, unpack
from kvstore.errors import ChunkTooLarge, CodecError, InvalidInput, UnknownNamespace
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.writer import WriteJob

if TYPE_CHECKING:
    from kvstore.tiers.store import TieredStore



class EncodedPuts:
    """Puts of verified containers into encoded tiers, and the decoded-bytes checksums they keep.

    Invariants: a container is stored only in a tier below the top whose codec
    choice for the namespace writes exactly its codec and params, so every
    read of it decodes as any chunk of that tier does; the tier's own budget
    and eviction apply (its ``put``), and the chunk is indexed and announced
    only once the tier holds it. The container's XXH3-128 goes into the
    tier's record (checked on every read). Where the sender gave the decoded
    chunk's checksum (lossless codecs), it is kept while any tier holds the
    key, and a read whose decoded bytes differ is a miss.
    """

    def __init__(self, store: TieredStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._written: dict[tuple[bytes, str, str, tuple[tuple[str, object], ...], int], dict[str, object]] = {}
        self._digests: dict[ChunkKey, bytes] = {}

    def written_params(self, ns: Namespace, tier: str, num_tokens: int) -> tuple[str, dict[str, object]] | None:
        """The codec and container params ``tier`` writes for ``num_tokens`` tokens of ``ns``; None: raw tier."""
        choice = self._store.codecs.choice(ns.id, tier)
        if choice is None:
            return None
        key = (bytes(ns.id), tier, choice.codec, tuple(sorted(choice.params.items())), num_tokens)
        with self._lock:
            found = self._written.get(key)
        if found is None:
            layout = ChunkLayout(ns.spec, num_tokens)
            try:
                probe = make_codec(choice.codec, dict(choice.params)).encode(np.zeros(layout.nbytes, np.uint8), layout)
            except InvalidInput:  # e.g. a quantizer and integer KV: nothing arrives encoded for it
                found = {}
            else:
                found = dict(unpack(probe, verify=False).params)
            with self._lock:
                self._written[key] = found
        return (choice.codec, found) if found else None

    def tier_for(self, ns: Namespace, container: Container) -> str | None:
        """The first tier below the top that writes exactly this container's codec and params, or None."""
        want = (container.codec, dict(container.params))
        for tier in self._store.tiers[1:]:
            if self._store.codecs.encoded(tier.name) and self.written_params(ns, tier.name,
                                                                              container.num_tokens) == want:
                return tier.name
        return None

    def put(self, ns: Namespace, key: ChunkKey, tier: str, data: U8, digest: bytes,
            raw_digest: bytes | None = None, cost: float = 1.0) -> bool:
        """Store a verified container of ``ns`` in ``tier`` as it is (see the class docstring).

        Args:
            data: the container's bytes, already checked (``unpack`` with every section's checksum)
                and matching ``tier_for``.
            digest: XXH3-128 of ``data`` (kept in the tier's record).
            raw_digest: XXH3-128 of the decoded chunk, where known; later reads check it.

        Returns:
            True once the tier holds the chunk; False if it could not take it (counted by the tier).

        Raises:
            UnknownNamespace, InvalidInput (an unknown or raw tier, a bad key), ChunkTooLarge.
        """
        store = self._store
        store._check(ns)  # noqa: SLF001 - the store's own collaborator
        if len(key) != 32:
            raise InvalidInput(f"chunk keys are 32 bytes, got {len(key)}")
        index = next((i for i, t in enumerate(store.tiers) if t.name == tier and i > 0), None)
        if index is None or not store.codecs.encoded(tier):
            raise InvalidInput(f"tier {tier!r} is not an encoded tier below the top")
        if data.size > store.config.max_chunk_bytes:
            raise ChunkTooLarge(f"container of {data.size} bytes exceeds max_chunk_bytes {store.config.max_chunk_bytes}")
        meta = ChunkMeta(ns.id, int(data.size), digest, cost)
        if raw_digest is not None:
            with self._lock:
                self._digests[key] = raw_digest
        if not store.tiers[index].put(key, data, meta):
            if key not in store.index:
                self.discard(key)
            return False
        store._stored(key, meta, index)  # noqa: SLF001 - indexed and announced once fetchable
        lower = list(range(index + 1, len(store.tiers)))
        if store.config.write_mode == "write_through" and lower:
            job = WriteJob(key, meta, lower, data=np.array(data), encoded=True)  # the job owns a copy
            store._writer.submit(job)  # noqa: SLF001 - the store's own collaborator
        return True

    def prepare(self, key: ChunkKey, meta: ChunkMeta, tier: str, container: U8) -> tuple[U8, ChunkMeta] | None:
        """What ``tier`` stores for a chunk held as ``container`` (an encoded tier's): the container
        itself where the tier's codec writes exactly its codec and params, else the decoded chunk
        (checked against its sender's checksum where one was kept), re-encoded for an encoded tier.
        None (skip the tier) for a namespace no longer registered.

        Raises:
            CodecError: the container does not decode, or not to the bytes its sender's checksum
                names (the writer counts the failure).
        """
        store = self._store
        try:
            ns = store.namespace(meta.namespace)
        except UnknownNamespace:
            return None
        c = unpack(container, verify=False)
        if self.written_params(ns, tier, c.num_tokens) == (c.codec, dict(c.params)):
            return container, meta
        raw = np.empty(c.layout.nbytes, np.uint8)
        store.codecs.decode_into(ns, container, raw)
        if not self.verify(key, raw):
            raise CodecError("a container stored as it arrived decodes to other bytes than its sender's")
        encoded = store.codecs.encode(ns, tier, raw)
        if encoded is not None:
            return encoded, ChunkMeta(ns.id, int(encoded.size), b"", meta.cost)
        return raw, ChunkMeta(ns.id, int(raw.size), checksum(raw), meta.cost)

    def verify(self, key: ChunkKey, decoded: U8) -> bool:
        """False if a decoded chunk fails the checksum its sender gave (True where none was kept)."""
        with self._lock:
            want = self._digests.get(key)
        return want is None or checksum(decoded) == want

    def discard(self, key: ChunkKey) -> None:
        """The key left every tier: forget its decoded checksum."""
        with self._lock:
            self._digests.pop(key, None)

"""The blocking client: :class:`Client`.

    with Client.connect("unix:///run/kvstore.sock") as kv:
        ns = kv.register(namespace)
        kv.put(ns, key, tensor)
        hit = kv.lookup(ns, tokens)
        kv.get(ns, hit.keys[0], out, lease=hit.lease)

Thread-safe: each call borrows a pooled connection. Over a Unix socket to a
daemon of the same user, gets and puts go through the shared-memory arena
(one copy); otherwise chunks stream over the socket straight from and into
the caller's buffers. See docs/client.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Self, TypeVar

from kvstore.buffers import U8, BufferLike
from kvstore.client import _frames as F
from kvstore.client._frames import ClientOptions, LookupHit, RemoteStats, ServerInfo
from kvstore.client._shm import ArenaCache, ShmArena
from kvstore.client._sync_conn import SyncConn, SyncPool
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, Namespace, TokenInput
from kvstore.service.protocol import MsgType
from kvstore.spec import KVSpec

T = TypeVar("T")


class Client:
    """A thread-safe, pooled, retrying client of one kvstore daemon (see the module docstring)."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05, pool_size: int = 4, use_shm: bool = True, verify: bool = False,
                 tls: bool = False, tls_ca: str | None = None) -> None:
        self.endpoint = F.parse_url(url)
        self.options = ClientOptions(token=token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                     pool_size=pool_size, use_shm=use_shm, verify=verify, tls=tls,
                                     tls_ca=tls_ca)
        self._pool = SyncPool(self.endpoint, self.options)
        self._arenas = ArenaCache()
        self._info: ServerInfo | None = None

    @classmethod
    def connect(cls, url: str, *, token: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                backoff_s: float = 0.05, pool_size: int = 4, use_shm: bool = True, verify: bool = False,
                tls: bool = False, tls_ca: str | None = None) -> Client:
        """A client whose first connection is open and greeted (HELLO checked the token).

        Raises:
            RemoteUnavailable: the daemon cannot be reached (after retries).
            Unauthorized: the daemon refused the token.
        """
        client = cls(url, token=token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                     pool_size=pool_size, use_shm=use_shm, verify=verify, tls=tls, tls_ca=tls_ca)
        try:
            client.ping()
        except BaseException:
            client.close()
            raise
        return client

    @property
    def info(self) -> ServerInfo:
        """What the daemon said in HELLO (connects if no connection was made yet)."""
        if self._info is None:
            self.ping()
        assert self._info is not None  # set by the first connection's call
        return self._info

    # -- namespaces, lookups -----------------------------------------------------------
    def register(self, ns: Namespace | KVSpec, *, chunk_tokens: int = 256, scheme: str = "sha256-chain-v1") -> Namespace:
        """Register a namespace (idempotent); a bare KVSpec takes the token's tenant. Returns the namespace."""
        def call(c: SyncConn) -> Namespace:
            header, full = F.register_header(ns, c.info.tenant, chunk_tokens, scheme)
            return F.registered(full, c.call(MsgType.REGISTER, header)[0])

        return self._retry(call)

    def lookup(self, ns: Namespace, tokens: TokenInput | None = None, *, keys: Sequence[bytes] | None = None,
               lease: bool = True, ttl_s: float | None = None, wait_s: float = 0.0) -> LookupHit:
        """The longest cached prefix of ``tokens`` (or of engine-provided ``keys``), its hits leased.

        ``wait_s`` > 0: where the hit stops at chunks announced as on their way (:meth:`announce`),
        wait up to ``wait_s`` (bounded by the daemon) for them; a wait that runs out returns the
        shorter hit.
        """
        header, payload = F.lookup_request(ns, tokens, keys, lease, ttl_s, wait_s)
        return self._retry(lambda c: F.lookup_hit(c.call(MsgType.LOOKUP, header, payload, extra_s=wait_s)[0]))

    def announce(self, ns: Namespace, keys: Sequence[bytes], ttl_s: float) -> int:
        """Tell the daemon these chunks are on their way (stored within ``ttl_s``); how many it now expects.

        A lookup with ``wait_s`` waits for them. Chunks the namespace already holds are not expected.

        Raises:
            InvalidInput: ``ttl_s`` outside the daemon's bounds, too many keys; ServerBusy: the daemon
                expects as many chunks as it may.
        """
        header = F.announce_header(ns, keys, ttl_s)
        return self._retry(lambda c: int(c.call(MsgType.ANNOUNCE, header)[0]["announced"]))

    def withdraw(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """Take back an announcement (the chunks will not come); how many were still expected."""
        header = F.announce_header(ns, keys, None)
        return self._retry(lambda c: int(c.call(MsgType.ANNOUNCE, header)[0]["withdrawn"]))

    # -- puts ---------------------------------------------------------------------------
    def put(self, ns: Namespace, key: bytes, data: BufferLike, *, cost: float = 1.0) -> bool:
        """Store one chunk; True if the daemon holds it (False: its CPU tier had no room)."""
        return self.put_many(ns, [key], [data], cost=cost)[0]

    def put_many(self, ns: Namespace, keys: Sequence[bytes], datas: Sequence[BufferLike], *,
                 cost: float = 1.0) -> list[bool]:
        """Store chunks (bytes, numpy arrays, CPU tensors), batched per request within the daemon's limits."""
        if len(keys) != len(datas):
            raise InvalidInput(f"{len(keys)} keys but {len(datas)} chunks")
        wire_keys, chunks = F.as_keys(keys), F.chunks_of(datas)
        return self._retry(lambda c: self._put_on(c, ns, wire_keys, chunks, cost))

    def _put_on(self, c: SyncConn, ns: Namespace, keys: list[bytes], chunks: list[U8], cost: float) -> list[bool]:
        """One request per batch that fits the daemon's limits: shared memory where offered, else PUT."""
        info, stored = c.info, []
        shm = info.shm_path is not None
        limit = info.max_inflight_bytes if shm else F.put_limit(info, len(keys))
        for part in F.batches([x.size for x in chunks], limit):
            k, x = keys[part.start : part.stop], chunks[part.start : part.stop]
            stored += self._shm_put(c, ns, k, x, cost) if shm else self._socket_put(c, ns, k, x, cost)
        return stored

    @staticmethod
    def _socket_put(c: SyncConn, ns: Namespace, keys: list[bytes], chunks: list[U8], cost: float) -> list[bool]:
        header = {"ns": ns.id, "keys": keys, "cost": float(cost), "sizes": [int(x.size) for x in chunks]}
        return [bool(s) for s in c.call_put(header, chunks)["stored"]]

    def _shm_put(self, c: SyncConn, ns: Namespace, keys: list[bytes], chunks: list[U8], cost: float) -> list[bool]:
        arena = self._arenas.get(c.info.shm_path or "", c.info.shm_size)
        header, _ = c.call(MsgType.SHM_RESERVE, {"ns": ns.id, "keys": keys, "sizes": [int(x.size) for x in chunks]})
        offsets, rid = header["offsets"], header["reservation"]
        if rid is None:
            return [o == -1 for o in offsets]
        verify = self.options.verify
        try:
            if verify:
                digests = [self._shm_copy(c, arena, rid, i, o, x) for i, (o, x) in enumerate(zip(offsets, chunks))]
            else:
                F.shm_fill(arena, offsets, chunks)
        except BaseException:
            c.send_only(MsgType.SHM_COMMIT, {"reservation": rid, "abort": True})
            raise
        commit = {"reservation": rid, "checksums": digests if verify else None, "cost": float(cost)}
        return [bool(s) for s in c.call(MsgType.SHM_COMMIT, commit)[0]["stored"]]

    @staticmethod
    def _shm_copy(c: SyncConn, arena: ShmArena, rid: int, index: int, offset: int, src: U8) -> bytes:
        """Copy one chunk into its reserved extent, telling the daemon each step (it hashes meanwhile)."""
        if offset < 0:
            return F.NO_CHECKSUM
        copy = arena.copier(offset, src)
        while not copy.done:
            upto = copy.advance(F.SHM_STEP)
            if not copy.done:
                c.send_only(MsgType.SHM_WRITTEN, {"reservation": rid, "index": index, "upto": upto})
        return copy.digest()

    # -- gets ---------------------------------------------------------------------------
    def get(self, ns: Namespace, key: bytes, out: BufferLike, *, lease: int | None = None) -> int | None:
        """Copy a chunk into ``out``; its size, or None on a miss. With a lease, reads its pinned copy."""
        return self.get_many(ns, [key], [out], lease=lease)[0]

    def get_many(self, ns: Namespace, keys: Sequence[bytes], outs: Sequence[BufferLike], *,
                 lease: int | None = None) -> list[int | None]:
        """:meth:`get` for each key into the matching buffer (one request; chunks land in place)."""
        if len(keys) != len(outs):
            raise InvalidInput(f"{len(keys)} keys but {len(outs)} output buffers")
        wire_keys, views = F.as_keys(keys), F.out_views(outs)
        return self._retry(lambda c: self._get_on(c, ns, wire_keys, views, lease))

    def _get_on(self, c: SyncConn, ns: Namespace, keys: list[bytes], outs: list[U8],
                lease: int | None) -> list[int | None]:
        header: dict[str, object] = {"ns": ns.id, "keys": keys, "lease": lease}
        if c.info.shm_path is not None:
            return self._shm_get(c, header, outs)
        header["capacity"] = [int(o.size) for o in outs]
        reply, _ = c.call(MsgType.GET, header, outs=outs)
        sizes = reply["sizes"]
        if self.options.verify:
            for i, (size, out) in enumerate(zip(sizes, outs)):
                if size >= 0:
                    F.verify(i, out[:size], reply["checksums"][i])
        return F.sizes_or_none(sizes)

    def _shm_get(self, c: SyncConn, header: dict[str, object], outs: list[U8]) -> list[int | None]:
        arena = self._arenas.get(c.info.shm_path or "", c.info.shm_size)
        reply, _ = c.call(MsgType.SHM_GET, header)
        try:
            for i, (off, size, out) in enumerate(zip(reply["offsets"], reply["sizes"], outs)):
                if size >= 0:
                    F.check_capacity(i, size, out)
                    arena.copy_out(off, size, out)
                    if self.options.verify:
                        F.verify(i, out[:size], reply["checksums"][i])
        finally:
            if reply.get("pin") is not None:
                c.send_only(MsgType.SHM_RELEASE, {"pins": [reply["pin"]]})
        return F.sizes_or_none(reply["sizes"])

    # -- the rest -----------------------------------------------------------------------
    def delete(self, ns: Namespace, key: bytes) -> bool:
        """Remove a chunk of this namespace from every tier; True if one held it."""
        return self.delete_many(ns, [key]) == 1

    def delete_many(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        header = {"ns": ns.id, "keys": F.as_keys(keys)}
        return self._retry(lambda c: int(c.call(MsgType.DELETE, header)[0]["deleted"]))

    def prefetch(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """Promote chunks from lower tiers into the CPU tier; how many were promoted."""
        header = {"ns": ns.id, "keys": F.as_keys(keys)}
        return self._retry(lambda c: int(c.call(MsgType.PREFETCH, header)[0]["promoted"]))

    def release(self, lease: int | LookupHit | None) -> bool:
        """Give back a lease's pins early (they also expire); harmless twice."""
        lease_id = lease.lease if isinstance(lease, LookupHit) else lease
        if lease_id is None:
            return False
        return self._retry(lambda c: bool(c.call(MsgType.RELEASE, {"lease": lease_id})[0]["released"]))

    def list_keys(self, ns: Namespace, limit: int = 10000) -> list[ChunkKey]:
        """Keys of this namespace in the daemon's local tiers (at most ``limit``)."""
        reply = self._retry(lambda c: c.call(MsgType.LIST, {"ns": ns.id, "limit": limit})[0])
        return [ChunkKey(k) for k in reply["keys"]]

    def clear(self, ns: Namespace) -> int:
        """Remove every chunk of this namespace; how many were removed."""
        return self._retry(lambda c: int(c.call(MsgType.CLEAR, {"ns": ns.id})[0]["removed"]))

    def stats(self) -> RemoteStats:
        return self._retry(lambda c: F.remote_stats(c.call(MsgType.STATS, {})[0]))

    def ping(self) -> float:
        """Round-trip time of one request, in seconds."""
        def call(c: SyncConn) -> float:
            t0 = time.perf_counter()
            c.call(MsgType.PING, {})
            return time.perf_counter() - t0

        return self._retry(call)

    def close(self) -> None:
        """Close every pooled connection (the daemon gives back what they held)."""
        self._pool.close()
        self._arenas.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry(self, fn: Callable[[SyncConn], T]) -> T:
        """Run ``fn`` on a pooled connection; retry with backoff on failures worth retrying."""
        attempt = 0
        while True:
            try:
                with self._pool.connection() as c:
                    self._info = c.info
                    return fn(c)
            except Exception as exc:
                attempt += 1
                if not F.retriable(exc) or attempt > self.options.retries:
                    raise
                time.sleep(self.options.delay(attempt, exc))

"""The asyncio client: :class:`AsyncClient`, with the same methods as the blocking ``Client``.

    async with await AsyncClient.connect("kvstore://127.0.0.1:7481") as kv:
        ns = await kv.register(namespace)
        await kv.put(ns, key, tensor)
        hit = await kv.lookup(ns, tokens)

Requests from concurrent tasks are pipelined over a few connections; each
GET's chunks are received straight into the caller's buffers. Over a Unix
socket to a daemon of the same user, gets and puts use the shared-memory
arena (one copy). See docs/client.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar

from kvstore.buffers import U8, BufferLike
from kvstore.client import _frames as F
from kvstore.client._aio_conn import AsyncConn, AsyncPool, Pending
from kvstore.client._frames import ClientOptions, LookupHit, RemoteStats, ServerInfo, XPutResult
from kvstore.client._shm import ArenaCache, ShmArena
from kvstore.errors import InvalidInput
from kvstore.keys import ChunkKey, Namespace, TokenInput
from kvstore.service.protocol import MsgType
from kvstore.spec import KVSpec

T = TypeVar("T")


class AsyncClient:
    """A pooled, pipelining, retrying asyncio client of one kvstore daemon (see the module docstring)."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05, pool_size: int = 4, use_shm: bool = True, verify: bool = False,
                 tls: bool = False, tls_ca: str | None = None) -> None:
        self.endpoint = F.parse_url(url)
        self.options = ClientOptions(token=token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                     pool_size=pool_size, use_shm=use_shm, verify=verify, tls=tls,
                                     tls_ca=tls_ca)
        self._pool = AsyncPool(self.endpoint, self.options)
        self._arenas = ArenaCache()
        self._info: ServerInfo | None = None

    @classmethod
    async def connect(cls, url: str, *, token: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                      backoff_s: float = 0.05, pool_size: int = 4, use_shm: bool = True,
                      verify: bool = False, tls: bool = False, tls_ca: str | None = None) -> AsyncClient:
        """A client whose first connection is open and greeted (HELLO checked the token).

        Raises:
            RemoteUnavailable: the daemon cannot be reached (after retries).
            Unauthorized: the daemon refused the token.
        """
        client = cls(url, token=token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                     pool_size=pool_size, use_shm=use_shm, verify=verify, tls=tls, tls_ca=tls_ca)
        try:
            await client.ping()
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def info(self) -> ServerInfo | None:
        """What the daemon said in HELLO, once a connection was made."""
        return self._info

    async def register(self, ns: Namespace | KVSpec, *, chunk_tokens: int = 256,
                       scheme: str = "sha256-chain-v1") -> Namespace:
        """Register a namespace (idempotent); a bare KVSpec takes the token's tenant."""
        async def call(c: AsyncConn) -> Namespace:
            header, full = F.register_header(ns, _info(c).tenant, chunk_tokens, scheme)
            return F.registered(full, (await c.call(MsgType.REGISTER, header))[0])

        return await self._retry(call)

    async def lookup(self, ns: Namespace, tokens: TokenInput | None = None, *, keys: Sequence[bytes] | None = None,
                     lease: bool = True, ttl_s: float | None = None, wait_s: float = 0.0) -> LookupHit:
        """The longest cached prefix of ``tokens`` (or of engine-provided ``keys``), its hits leased.

        ``wait_s`` > 0: where the hit stops at chunks announced as on their way (:meth:`announce`),
        wait up to ``wait_s`` (bounded by the daemon) for them; a wait that runs out returns the
        shorter hit.
        """
        header, payload = F.lookup_request(ns, tokens, keys, lease, ttl_s, wait_s)

        async def call(c: AsyncConn) -> LookupHit:
            return F.lookup_hit((await c.call(MsgType.LOOKUP, header, payload, extra_s=wait_s))[0])

        return await self._retry(call)

    async def announce(self, ns: Namespace, keys: Sequence[bytes], ttl_s: float) -> int:
        """Tell the daemon these chunks are on their way (stored within ``ttl_s``); how many it now expects.

        A lookup with ``wait_s`` waits for them. Chunks the namespace already holds are not expected.

        Raises:
            InvalidInput: ``ttl_s`` outside the daemon's bounds, too many keys; ServerBusy: the daemon
                expects as many chunks as it may.
        """
        return int((await self._call(MsgType.ANNOUNCE, F.announce_header(ns, keys, ttl_s)))["announced"])

    async def withdraw(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """Take back an announcement (the chunks will not come); how many were still expected."""
        return int((await self._call(MsgType.ANNOUNCE, F.announce_header(ns, keys, None)))["withdrawn"])

    async def put(self, ns: Namespace, key: bytes, data: BufferLike, *, cost: float = 1.0) -> bool:
        """Store one chunk; True if the daemon holds it (False: its CPU tier had no room)."""
        return (await self.put_many(ns, [key], [data], cost=cost))[0]

    async def put_many(self, ns: Namespace, keys: Sequence[bytes], datas: Sequence[BufferLike], *,
                       cost: float = 1.0) -> list[bool]:
        """Store chunks (bytes, numpy arrays, CPU tensors), batched per request within the daemon's limits."""
        if len(keys) != len(datas):
            raise InvalidInput(f"{len(keys)} keys but {len(datas)} chunks")
        wire_keys, chunks = F.as_keys(keys), F.chunks_of(datas)
        return await self._retry(lambda c: self._put_on(c, ns, wire_keys, chunks, cost))

    async def _put_on(self, c: AsyncConn, ns: Namespace, keys: list[bytes], chunks: list[U8],
                      cost: float) -> list[bool]:
        """One request per batch that fits the daemon's limits: shared memory where offered, else PUT."""
        info, stored = _info(c), []
        shm = info.shm_path is not None
        limit = info.max_inflight_bytes if shm else F.put_limit(info, len(keys))
        for part in F.batches([x.size for x in chunks], limit):
            k, x = keys[part.start : part.stop], chunks[part.start : part.stop]
            if shm:
                stored += await self._shm_put(c, info, ns, k, x, cost)
            else:
                header = {"ns": ns.id, "keys": k, "cost": float(cost), "sizes": [int(y.size) for y in x]}
                stored += [bool(s) for s in (await c.call_put(header, x))["stored"]]
        return stored

    async def _shm_put(self, c: AsyncConn, info: ServerInfo, ns: Namespace, keys: list[bytes], chunks: list[U8],
                       cost: float) -> list[bool]:
        arena = self._arenas.get(info.shm_path or "", info.shm_size)
        sizes = [int(x.size) for x in chunks]
        header, _ = await c.call(MsgType.SHM_RESERVE, {"ns": ns.id, "keys": keys, "sizes": sizes})
        offsets, rid = header["offsets"], header["reservation"]
        if rid is None:
            return [o == -1 for o in offsets]
        verify = self.options.verify
        try:
            if verify:
                digests = [await self._shm_copy(c, arena, rid, i, o, x) for i, (o, x) in enumerate(zip(offsets, chunks))]
            else:
                F.shm_fill(arena, offsets, chunks)
        except BaseException:
            c.send_only(MsgType.SHM_COMMIT, {"reservation": rid, "abort": True})
            raise
        commit = {"reservation": rid, "checksums": digests if verify else None, "cost": float(cost)}
        return [bool(s) for s in (await c.call(MsgType.SHM_COMMIT, commit))[0]["stored"]]

    @staticmethod
    async def _shm_copy(c: AsyncConn, arena: ShmArena, rid: int, index: int, offset: int, src: U8) -> bytes:
        """Copy one chunk into its reserved extent, telling the daemon each step (it hashes meanwhile)."""
        if offset < 0:
            return F.NO_CHECKSUM
        copy = arena.copier(offset, src)
        while not copy.done:
            upto = copy.advance(F.SHM_STEP)
            if not copy.done:
                await c.send_deferred(MsgType.SHM_WRITTEN, {"reservation": rid, "index": index, "upto": upto})
        return copy.digest()

    async def get(self, ns: Namespace, key: bytes, out: BufferLike, *, lease: int | None = None) -> int | None:
        """Copy a chunk into ``out``; its size, or None on a miss. With a lease, reads its pinned copy."""
        return (await self.get_many(ns, [key], [out], lease=lease))[0]

    async def get_many(self, ns: Namespace, keys: Sequence[bytes], outs: Sequence[BufferLike], *,
                       lease: int | None = None) -> list[int | None]:
        """:meth:`get` for each key into the matching buffer (one request; chunks land in place)."""
        if len(keys) != len(outs):
            raise InvalidInput(f"{len(keys)} keys but {len(outs)} output buffers")
        wire_keys, views = F.as_keys(keys), F.out_views(outs)
        return await self._retry(lambda c: self._get_on(c, ns, wire_keys, views, lease))

    async def _get_on(self, c: AsyncConn, ns: Namespace, keys: list[bytes], outs: list[U8],
                      lease: int | None) -> list[int | None]:
        header: dict[str, object] = {"ns": ns.id, "keys": keys, "lease": lease}
        info = _info(c)
        if info.shm_path is not None:
            return await self._shm_get(c, info, header, outs)
        header["capacity"] = [int(o.size) for o in outs]
        reply, _ = await c.call(MsgType.GET, header, outs=outs)
        if self.options.verify:
            for i, (size, out) in enumerate(zip(reply["sizes"], outs)):
                if size >= 0:
                    F.verify(i, out[:size], reply["checksums"][i])
        return F.sizes_or_none(reply["sizes"])

    async def _shm_get(self, c: AsyncConn, info: ServerInfo, header: dict[str, object],
                       outs: list[U8]) -> list[int | None]:
        arena = self._arenas.get(info.shm_path or "", info.shm_size)
        reply, _ = await c.call(MsgType.SHM_GET, header)
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

    async def delete(self, ns: Namespace, key: bytes) -> bool:
        """Remove a chunk of this namespace from every tier; True if one held it."""
        return await self.delete_many(ns, [key]) == 1

    async def delete_many(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        header = {"ns": ns.id, "keys": F.as_keys(keys)}
        return int((await self._call(MsgType.DELETE, header))["deleted"])

    async def prefetch(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """Promote chunks from lower tiers into the CPU tier; how many were promoted."""
        header = {"ns": ns.id, "keys": F.as_keys(keys)}
        return int((await self._call(MsgType.PREFETCH, header))["promoted"])

    async def release(self, lease: int | LookupHit | None) -> bool:
        """Give back a lease's pins early (they also expire); harmless twice."""
        lease_id = lease.lease if isinstance(lease, LookupHit) else lease
        if lease_id is None:
            return False
        return bool((await self._call(MsgType.RELEASE, {"lease": lease_id}))["released"])

    async def list_keys(self, ns: Namespace, limit: int = 10000) -> list[ChunkKey]:
        """Keys of this namespace in the daemon's local tiers (at most ``limit``)."""
        return [ChunkKey(k) for k in (await self._call(MsgType.LIST, {"ns": ns.id, "limit": limit}))["keys"]]

    async def clear(self, ns: Namespace) -> int:
        """Remove every chunk of this namespace; how many were removed."""
        return int((await self._call(MsgType.CLEAR, {"ns": ns.id}))["removed"])

    async def have(self, ns: Namespace, keys: Sequence[bytes]) -> list[bool]:
        """Which of ``keys`` the daemon holds under this namespace (in any tier)."""
        header = {"ns": ns.id, "keys": F.as_keys(keys)}
        return [bool(p) for p in (await self._call(MsgType.HAVE, header))["present"]]

    async def xput(self, ns: Namespace, keys: Sequence[bytes], payloads: Sequence[bytes], codecs: Sequence[str],
                   raw_checksums: Sequence[bytes | None] | None = None, *, cost: float = 1.0) -> XPutResult:
        """Store chunks sent raw or as codec containers (``codecs[i]``; "raw" for raw bytes).

        The daemon checks each payload against its checksum (computed here), decodes containers,
        checks the decoded KV against the namespace's spec and ``raw_checksums[i]`` where given,
        and stores all of them or none. Not retried: a transfer resumes with HAVE instead.

        Raises:
            ChunkCorrupt: a payload or decoded chunk failed its checksum (nothing stored; resend).
            InvalidInput: another spec than the namespace's, or a malformed request.
        """
        header = F.xput_header(ns, keys, payloads, codecs, raw_checksums, cost)
        conn = await self._pool.connection()
        self._info = conn.info
        reply, _ = await conn.call(MsgType.XPUT, header, b"".join(payloads))
        return F.XPutResult([bool(s) for s in reply["stored"]], float(reply.get("decode_s", 0.0)))

    def live_connection(self) -> AsyncConn | None:
        """The open pooled connection the next request would use, without opening one (None: none)."""
        return self._pool.live()

    async def pipeline(self, requests: Sequence[tuple[MsgType, dict[str, Any]]]) -> tuple[AsyncConn, list[Pending]]:
        """Send payload-less requests at once, without waiting for each reply; not retried.

        On an open pooled connection the requests go out in one write; otherwise a new connection
        sends them right behind its HELLO (one round trip for all). Returns the connection and the
        pending replies in order: ``await conn.wait(p)`` gives each reply or raises its refusal.

        Raises:
            RemoteUnavailable, or the daemon's refusal of HELLO (e.g. Unauthorized).
        """
        conn = self._pool.live()
        if conn is not None:
            return conn, await conn.pipeline(requests)
        conn, pending = await AsyncConn.open_pipelined(self.endpoint, self.options, requests)
        self._pool.adopt(conn)
        self._info = conn.info
        return conn, pending

    async def stats(self) -> RemoteStats:
        return F.remote_stats(await self._call(MsgType.STATS, {}))

    async def ping(self) -> float:
        """Round-trip time of one request, in seconds."""
        t0 = time.perf_counter()
        await self._call(MsgType.PING, {})
        return time.perf_counter() - t0

    async def close(self) -> None:
        """Close every connection (the daemon gives back what they held)."""
        self._pool.close()
        self._arenas.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, mt: MsgType, header: dict[str, Any]) -> dict[str, Any]:
        async def call(c: AsyncConn) -> dict[str, Any]:
            return (await c.call(mt, header))[0]

        return await self._retry(call)

    async def _retry(self, fn: Callable[[AsyncConn], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection; retry with backoff on failures worth retrying."""
        attempt = 0
        while True:
            try:
                conn = await self._pool.connection()
                self._info = conn.info
                return await fn(conn)
            except Exception as exc:
                attempt += 1
                if not F.retriable(exc) or attempt > self.options.retries:
                    raise
                await asyncio.sleep(self.options.delay(attempt, exc))


def _info(conn: AsyncConn) -> ServerInfo:
    if conn.info is None:
        raise RuntimeError("connection used before its HELLO")  # AsyncConn.open sets it
    return conn.info

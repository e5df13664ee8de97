"""HAVE and XPUT as a push uses them: with the peer's encoded tiers and what it stored encoded.

The data-plane client's ``have`` and ``xput`` answer what every caller
needs; a push also reads the replies' additive fields (docs/protocol.md):
HAVE's ``stores`` (the codec and container params each of the namespace's
encoded tiers on the peer writes) and XPUT's ``encoded`` (per chunk, stored
as it arrived, without decoding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import _frames as F
from kvstore.client.aio import AsyncClient
from kvstore.keys import Namespace
from kvstore.service.protocol import MsgType

Params = Mapping[str, int | float | str | bool]


@dataclass(frozen=True, slots=True)
class PeerStore:
    """A codec and the exact container params one of the peer's tiers stores for the namespace."""

    codec: str
    params: Params = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HaveReply:
    """HAVE's answer: per key whether the peer holds it; the containers it stores as they arrive."""

    present: list[bool]
    stores: tuple[PeerStore, ...]


@dataclass(frozen=True, slots=True)
class XPutReply:
    """XPUT's answer: per chunk stored, stored encoded (as sent); the peer's time checking and decoding
    (``decode_s``) and storing (``store_s``: 0.0 from a peer that does not report it)."""

    stored: list[bool]
    encoded: list[bool]
    decode_s: float
    store_s: float = 0.0

    @property
    def busy_s(self) -> float:
        """All the peer's work on the chunks before it acknowledged them."""
        return self.decode_s + self.store_s


async def have(client: AsyncClient, ns: Namespace, keys: Sequence[bytes]) -> HaveReply:
    """HAVE for ``keys``; a peer without ``stores`` in its reply stores nothing encoded."""
    return have_reply(await client._call(MsgType.HAVE, have_header(ns, keys)))  # noqa: SLF001


def have_header(ns: Namespace, keys: Sequence[bytes]) -> dict[str, Any]:
    """HAVE's request header (to pipeline it with others)."""
    return {"ns": ns.id, "keys": F.as_keys(keys)}


def have_reply(reply: dict[str, Any]) -> HaveReply:
    """HAVE's answer from its reply header."""
    stores = []
    for entry in reply.get("stores") or []:
        if isinstance(entry, dict) and isinstance(entry.get("codec"), str) and isinstance(entry.get("params"), dict):
            stores.append(PeerStore(entry["codec"], dict(entry["params"])))
    return HaveReply([bool(p) for p in reply["present"]], tuple(stores))


async def xput(client: AsyncClient, ns: Namespace, keys: Sequence[bytes], payloads: Sequence[bytes],
               codecs: Sequence[str], raw_checksums: Sequence[bytes | None]) -> XPutReply:
    """XPUT (see ``AsyncClient.xput``), with the reply's per-chunk ``encoded``."""
    header = F.xput_header(ns, keys, payloads, codecs, raw_checksums, 1.0)
    conn = await client._pool.connection()  # noqa: SLF001 - not retried: a push resumes with HAVE
    reply, _ = await conn.call(MsgType.XPUT, header, b"".join(payloads))
    stored = [bool(s) for s in reply["stored"]]
    encoded = [bool(e) for e in reply.get("encoded", [False] * len(stored))]
    return XPutReply(stored, encoded, float(reply.get("decode_s", 0.0)), float(reply.get("store_s", 0.0)))

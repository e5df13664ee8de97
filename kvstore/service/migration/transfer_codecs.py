"""Codecs in transit: the candidate ladder, their cost measured on this machine, and payloads.

A chunk travels raw or as a codec container (kvstore/codecs). The default
ladder, least lossy first: ``raw`` and ``lossless`` (rank 0), ``int8``
(quant, rank 1), ``cachegen-0/2/4`` (ranks 2-4; with the namespace's
calibrated profile where one of its tiers uses cachegen with one), ``int4``
(rank 5); where that tier's cachegen level is another one, it joins the
ladder in its place (the ranks after it move up by one). :func:`measure`
encodes and decodes one real chunk with each candidate to learn its ratio,
throughput and container params here; candidates that cannot encode the
namespace's dtype are dropped. Where a tier already holds the chunk in the
chosen codec (the same container params), :func:`payload` sends those bytes
without encoding again (:func:`held_encoded` tells the planner so), and a
peer whose tier stores those containers as they arrive
(:func:`peer_stores`) does not decode them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, InvalidInput
from kvstore.keys import ChunkKey, Namespace
from kvstore.service.migration.planner import CodecOption
from kvstore.service.migration.transfer_wire import PeerStore
from kvstore.tiers.base import Tier
from kvstore.tiers.store import TieredStore

Params = Mapping[str, int | float | str | bool]
DEFAULT_CACHEGEN_LEVEL = 1


@dataclass(frozen=True, slots=True)
class CodecCandidate:
    """A codec setting the planner may choose (before measurement)."""

    label: str
    codec: str
    params: Params = field(default_factory=dict)
    quality_rank: int = 0


def ladder(cachegen_params: Params | None = None) -> list[CodecCandidate]:
    """The default candidates, least lossy first; ``cachegen_params`` (e.g. a profile) join every level."""
    extra = {k: v for k, v in (cachegen_params or {}).items() if k != "level"}
    levels = [0, 2, 4]
    if cachegen_params is not None:
        own = cachegen_params.get("level", DEFAULT_CACHEGEN_LEVEL)
        if isinstance(own, int) and not isinstance(own, bool) and own not in levels:
            levels = sorted([*levels, own])
    return [
        CodecCandidate("raw", "raw"),
        CodecCandidate("lossless", "lossless"),
        CodecCandidate("int8", "quant", {"bits": 8}, 1),
        *(CodecCandidate(f"cachegen-{lv}", "cachegen", {**extra, "level": lv}, 2 + i) for i, lv in enumerate(levels)),
        CodecCandidate("int4", "quant", {"bits": 4}, 2 + len(levels)),
    ]


def namespace_cachegen_params(store: TieredStore, ns: Namespace) -> Params | None:
    """The cachegen parameters one of the namespace's tiers uses (its profile), or None."""
    for tier in store.tiers:
        choice = store.codecs.choice(ns.id, tier.name)
        if choice is not None and choice.codec == "cachegen":
            return dict(choice.params)
    return None


def select(candidates: Sequence[CodecCandidate], policy: str) -> list[CodecCandidate]:
    """``auto``: every candidate; otherwise the one named.

    Raises:
        InvalidInput: an unknown policy.
    """
    if policy == "auto":
        return list(candidates)
    chosen = [c for c in candidates if c.label == policy]
    if not chosen:
        names = ", ".join(["auto", *(c.label for c in candidates)])
        raise InvalidInput(f"unknown codec policy {policy!r}; choose one of: {names}")
    return chosen


def measure(candidates: Sequence[CodecCandidate], sample: U8, ns: Namespace) -> list[CodecOption]:
    """Each candidate's ratio and coder throughput on ``sample`` (one chunk of ``ns``), timed here.

    Candidates that cannot encode this KV (e.g. quantizers on integer dtypes) are left out.
    """
    layout = _layout(ns, sample)
    out: list[CodecOption] = []
    for c in candidates:
        if c.codec == "raw":
            out.append(CodecOption(c.label, "raw", {}, c.quality_rank))
            continue
        codec = make_codec(c.codec, dict(c.params))
        try:
            t0 = time.perf_counter()
            blob = codec.encode(sample, layout)
            t1 = time.perf_counter()
            codec.decode_into(blob, np.empty(sample.size, dtype=np.uint8))
            t2 = time.perf_counter()
        except (InvalidInput, CodecError):
            continue
        n = sample.size
        out.append(CodecOption(c.label, c.codec, dict(c.params), c.quality_rank, n / len(blob),
                               n / max(t1 - t0, 1e-9), n / max(t2 - t1, 1e-9),
                               dict(unpack(blob, verify=False).params)))  # fmt: skip
    return out


def payload(store: TieredStore, ns: Namespace, key: ChunkKey, raw: U8, option: CodecOption) -> bytes:
    """The bytes to send for one chunk with ``option``: raw bytes, a stored container, or a fresh one."""
    if option.codec == "raw":
        return raw.tobytes()
    stored = _stored_container(store, ns, key, option)
    if stored is not None:
        return stored
    return make_codec(option.codec, dict(option.params)).encode(raw, _layout(ns, raw))


def _stored_container(store: TieredStore, ns: Namespace, key: ChunkKey, option: CodecOption) -> bytes | None:
    for tier in _holding_tiers(store, ns, key, option):
        found = tier.read(key)
        if found is not None and found[1].namespace == ns.id:
            return found[0].tobytes()
    return None


def held_encoded(store: TieredStore, ns: Namespace, key: ChunkKey, option: CodecOption) -> bool:
    """Whether a local tier holds ``key``'s container with exactly ``option``'s codec and params."""
    return any(True for _ in _holding_tiers(store, ns, key, option))


def _holding_tiers(store: TieredStore, ns: Namespace, key: ChunkKey, option: CodecOption) -> Iterator[Tier]:
    """Local tiers below the top that hold ``key`` of ``ns`` as containers ``option`` writes."""
    if option.codec == "raw" or option.container_params is None:
        return
    want = (option.codec, dict(option.container_params))
    for tier in store.tiers[1:]:
        if tier.shared and not store.index.where(key) >> store.tiers.index(tier) & 1:
            continue
        meta = tier.meta(key) if not tier.shared else None
        if not tier.shared and (meta is None or meta.namespace != ns.id):
            continue
        if store.encoded.written_params(ns, tier.name, ns.chunk_tokens) == want:
            yield tier


def peer_stores(option: CodecOption, stores: Iterable[PeerStore]) -> bool:
    """Whether the peer stores ``option``'s containers as they arrive (HAVE's ``stores``)."""
    return option.container_params is not None and any(
        s.codec == option.codec and dict(s.params) == dict(option.container_params) for s in stores
    )


def _layout(ns: Namespace, raw: U8) -> ChunkLayout:
    per = ns.spec.bytes_per_token
    if raw.size % per or raw.size == 0:
        raise InvalidInput(f"{raw.size} bytes is not a whole number of tokens ({per} bytes each)")
    return ChunkLayout(ns.spec, raw.size // per)


def speed_note(option: CodecOption) -> str:
    """A short human description of an option's measured cost."""
    enc = "inf" if math.isinf(option.encode_bytes_per_s) else f"{option.encode_bytes_per_s / 1e6:.0f} MB/s"
    return f"{option.label}: ratio {option.ratio:.2f}, encode {enc}"

"""Which codec each tier stores its chunks with, per namespace.

A tier named in the defaults is *encoded*: everything it holds is a codec
container (docs/codecs.md), decoded on the way out whatever codec wrote it.
Other tiers hold raw KV. A namespace may choose another codec for an encoded
tier (``raw`` included), never turn an encoded tier into a raw one, so a
reader always knows what a tier's bytes are.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

import kvstore.codecs  # noqa: F401  (registers every codec)
from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, make_codec
from kvstore.codecs.container import unpack
from kvstore.errors import CodecError, InvalidInput, UnknownName
from kvstore.keys import Namespace, NamespaceId


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """A codec name and its parameters (validated when the choice is made)."""

    codec: str
    params: Mapping[str, int | float | str | bool] = field(default_factory=dict)


class TierCodecs:
    """Per-tier default codecs and per-namespace overrides; builds codec objects once."""

    def __init__(self, defaults: Mapping[str, CodecChoice]) -> None:
        self._defaults = dict(defaults)
        self._overrides: dict[tuple[NamespaceId, str], CodecChoice] = {}
        self._codecs: dict[CodecChoice | tuple[str, tuple[tuple[str, object], ...]], Codec] = {}
        self._lock = threading.Lock()
        for choice in self._defaults.values():
            self._codec(choice)  # fail fast on an unknown codec or bad params

    def encoded(self, tier: str) -> bool:
        return tier in self._defaults

    def set(self, ns: NamespaceId, tier: str, choice: CodecChoice) -> None:
        """Choose the codec a namespace's chunks get in an encoded tier.

        Raises:
            InvalidInput: the tier holds raw KV, or the codec's parameters are bad.
            UnknownName: no such codec.
        """
        if not self.encoded(tier):
            raise InvalidInput(f"tier {tier!r} holds raw KV; give it a default codec to choose codecs in it")
        self._codec(choice)
        with self._lock:
            self._overrides[(ns, tier)] = choice

    def choice(self, ns: NamespaceId, tier: str) -> CodecChoice | None:
        return self._overrides.get((ns, tier)) or self._defaults.get(tier)

    def encode(self, ns: Namespace, tier: str, raw: U8) -> U8 | None:
        """The container for ``raw`` in ``tier``; None if the tier holds raw KV.

        Raises:
            InvalidInput: ``raw`` is not a whole number of tokens of the namespace's KV.
        """
        choice = self.choice(ns.id, tier)
        if choice is None:
            return None
        per_token = ns.spec.bytes_per_token
        if raw.size % per_token:
            raise InvalidInput(f"{raw.size} bytes is not a whole number of tokens ({per_token} bytes each)")
        layout = ChunkLayout(ns.spec, raw.size // per_token)
        return np.frombuffer(self._codec(choice).encode(raw, layout), dtype=np.uint8)

    def decode_into(self, ns: Namespace, data: U8, out: U8) -> int:
        """Decode a container of ``ns``'s KV into ``out``; returns the decoded size.

        Raises:
            CodecError: malformed or corrupt, or KV of another spec.
            InvalidInput: ``out`` is too small.
        """
        container = unpack(data, verify=False)
        if container.spec != ns.spec:
            raise CodecError("container holds KV of another spec than the namespace's")
        return self._decoder(ns.id, container.codec).decode_into(data, out).nbytes

    def _decoder(self, ns: NamespaceId, name: str) -> Codec:
        """A codec object that decodes ``name``'s containers: one configured for the namespace or a tier
        (a container holds its own params; the configuration gives what it does not, e.g. where
        cachegen's profiles are), else one with default params.

        Raises:
            CodecError: no codec of that name is registered.
        """
        with self._lock:
            mine = [c for (n, _), c in self._overrides.items() if n == ns and c.codec == name]
        choice = next(iter(mine), None) or next((c for c in self._defaults.values() if c.codec == name), None)
        try:
            return self._codec(choice or CodecChoice(name))
        except (UnknownName, InvalidInput) as exc:
            raise CodecError(f"cannot decode a {name!r} container: {exc}") from None

    def _codec(self, choice: CodecChoice) -> Codec:
        key = (choice.codec, tuple(sorted(choice.params.items())))
        with self._lock:
            codec = self._codecs.get(key)
            if codec is None:
                params: CodecParams = dict(choice.params)
                codec = self._codecs[key] = make_codec(choice.codec, params)
            return codec

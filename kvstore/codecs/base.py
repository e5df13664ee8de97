"""The codec interface and its registry.

A codec turns the KV of a chunk (``num_tokens`` tokens laid out as the KV
spec says) into a self-describing container (``container.py``) and back.
Codecs are registered by name and chosen per tier and per namespace; a
container names the codec that wrote it, so any reader can decode it.

Invariants: ``decode(encode(x))`` has exactly ``x``'s shape and dtype;
lossless codecs return ``x`` bit for bit; decoding untrusted bytes either
succeeds or raises ``CodecError`` (never another exception, a hang, or an
allocation larger than the container says, bounded by ``MAX_DECODED_BYTES``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from kvstore.buffers import U8
from kvstore.errors import InvalidInput, UnknownName
from kvstore.spec import KVSpec

#: a container may never claim more decoded bytes than this (bounds allocation on hostile input)
MAX_DECODED_BYTES = 1 << 31

CodecParams = Mapping[str, int | float | str | bool]


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """What a chunk's raw bytes are: the KV spec and the number of tokens."""

    spec: KVSpec
    num_tokens: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.chunk_shape(self.num_tokens)

    @property
    def nbytes(self) -> int:
        return self.spec.chunk_nbytes(self.num_tokens)


class Codec(ABC):
    """Encodes a chunk's raw bytes into a container and decodes it back.

    ``params`` are the codec's settings (level, bits, group layout...); they
    are written into every container so decoding needs no configuration.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]

    def __init__(self, params: CodecParams | None = None) -> None:
        self.params: dict[str, int | float | str | bool] = dict(params or {})

    @abstractmethod
    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """A container holding ``raw`` (``layout.nbytes`` bytes of KV).

        Raises:
            InvalidInput: ``raw`` has the wrong size for ``layout``, or the
                codec does not support the layout's dtype.
        """

    @abstractmethod
    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Decode a container this codec wrote into ``out`` (at least ``layout.nbytes``).

        Raises:
            CodecError: malformed, truncated, corrupt, or not this codec's.
            InvalidInput: ``out`` is too small.
        """


CodecFactory = Callable[[CodecParams | None], Codec]
_CODECS: dict[str, CodecFactory] = {}


def register_codec(name: str, factory: CodecFactory) -> None:
    if name in _CODECS:
        raise InvalidInput(f"codec {name!r} is already registered")
    _CODECS[name] = factory


def make_codec(name: str, params: CodecParams | None = None) -> Codec:
    """A codec by name with its parameters.

    Raises:
        UnknownName: no codec of that name.
        InvalidInput: bad parameters.
    """
    try:
        factory = _CODECS[name]
    except KeyError:
        raise UnknownName(f"unknown codec {name!r}; known: {sorted(_CODECS)}") from None
    return factory(params)


def codec_names() -> list[str]:
    return sorted(_CODECS)

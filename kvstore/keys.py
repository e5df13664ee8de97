"""Namespaces, chunking and the hash schemes that name chunks.

Every key is a 32-byte SHA-256 digest computed from explicitly encoded bytes
(never Python's ``hash``), so the same tokens under the same namespace give
the same key in every process and on every machine. The byte layouts are
specified in docs/keys.md together with test vectors.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NewType

import numpy as np
import numpy.typing as npt

from kvstore.errors import InvalidInput, UnknownName

try:  # the C loop of the chained hash; optional (setup.py)
    import kvstore._chainhash as _chainhash
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _chainhash = None  # type: ignore[assignment]
from kvstore.spec import KVSpec, encode_fields

ChunkKey = NewType("ChunkKey", bytes)
"""32-byte key of one stored chunk (prefix key, content key or engine key)."""

NamespaceId = NewType("NamespaceId", bytes)
"""32-byte digest naming a namespace (tenant + KV spec + hash scheme + chunk size)."""

KEY_BYTES = 32
DEFAULT_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 1 << 20

NS_DOMAIN = b"kvstore-ns-v1\x00"
PREFIX_DOMAIN = b"kvstore-prefix-v1\x00"
CONTENT_DOMAIN = b"kvstore-content-v1\x00"
ENGINE_DOMAIN = b"kvstore-engine-v1\x00"
ZERO_KEY = bytes(KEY_BYTES)

TokenInput = Sequence[int] | npt.NDArray[np.integer]
EngineHash = bytes | str | int


@dataclass(frozen=True, slots=True)
class Namespace:
    """Tenant + KV spec + hash scheme + chunk size: the space a key lives in.

    Invariant: ``id`` is a digest of every other field, so keys derived under
    two namespaces that differ in any field never meet.
    """

    tenant: str
    spec: KVSpec
    scheme: str = "sha256-chain-v1"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    id: NamespaceId = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tenant:
            raise InvalidInput("namespace needs a non-empty tenant")
        if not isinstance(self.chunk_tokens, int) or not 1 <= self.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise InvalidInput(f"chunk_tokens must be in [1, {MAX_CHUNK_TOKENS}], got {self.chunk_tokens!r}")
        get_scheme(self.scheme)  # raises UnknownName early
        digest = hashlib.sha256(
            NS_DOMAIN
            + encode_fields([self.tenant, self.scheme, str(self.chunk_tokens)])
            + self.spec.identity_bytes()
        ).digest()
        object.__setattr__(self, "id", NamespaceId(digest))

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one full chunk in this namespace's spec (before any codec)."""
        return self.spec.chunk_nbytes(self.chunk_tokens)


@dataclass(frozen=True, slots=True)
class ChunkSplit:
    """How a token sequence divides into chunks: only full chunks are keyed."""

    num_full_chunks: int
    remainder_tokens: int


def as_token_array(tokens: TokenInput) -> npt.NDArray[np.uint32]:
    """Validate tokens and return them as a contiguous little-endian uint32 array.

    Raises:
        InvalidInput: not one-dimensional, not integers, or outside [0, 2**32).
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # a torch tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidInput(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<u4"):
        if int(arr.min()) < 0 or int(arr.max()) >= 1 << 32:
            raise InvalidInput("token ids must lie in [0, 2**32)")
        arr = arr.astype("<u4")
    return np.ascontiguousarray(arr)


def split_tokens(ns: Namespace, num_tokens: int) -> ChunkSplit:
    """Full chunks and the partial tail of a sequence of ``num_tokens`` tokens."""
    full, rest = divmod(num_tokens, ns.chunk_tokens)
    return ChunkSplit(full, rest)


class HashScheme(ABC):
    """A way of naming chunks; registered by name, part of every namespace."""

    name: ClassVar[str]
    #: True when keys come from the engine's own block hashes, not from tokens
    engine_provided: ClassVar[bool] = False

    @abstractmethod
    def iter_prefix_keys(self, ns: Namespace, tokens: npt.NDArray[np.uint32]) -> Iterator[ChunkKey]:
        """Yield the chained key of each full chunk of ``tokens``, in order."""


class Sha256ChainScheme(HashScheme):
    """k_i = SHA-256(domain || ns.id || u32le(C) || k_{i-1} || tokens_i as u32le).

    With the C helper (kvstore._chainhash, built at install) keys are hashed
    in batches of growing size (8, 32, 128, ... chunks), so a lookup that
    misses early hashes little and a long hit pays one C call per batch.
    Without it, the same keys are computed in Python.
    """

    name = "sha256-chain-v1"
    FIRST_BATCH = 8

    def iter_prefix_keys(self, ns: Namespace, tokens: npt.NDArray[np.uint32]) -> Iterator[ChunkKey]:
        n = tokens.size // ns.chunk_tokens
        if n == 0:
            return
        prefix = PREFIX_DOMAIN + ns.id + struct.pack("<I", ns.chunk_tokens)
        view = tokens.data.cast("B")
        if _chainhash is None:
            yield from _py_chain(prefix, view, ns.chunk_tokens * 4, n)
            return
        step = ns.chunk_tokens * 4
        done, batch, prev = 0, self.FIRST_BATCH, ZERO_KEY
        while done < n:
            count = min(batch, n - done)
            keys = _chainhash.chain(prefix, prev, view[done * step :], step, count)
            for key in keys:
                yield ChunkKey(key)
            prev = keys[-1]
            done += count
            batch *= 4


def _py_chain(prefix: bytes, view: memoryview, step: int, n: int) -> Iterator[ChunkKey]:
    copy = hashlib.sha256(prefix).copy
    prev = ZERO_KEY
    for off in range(0, n * step, step):
        h = copy()
        h.update(prev)
        h.update(view[off : off + step])
        prev = h.digest()
        yield ChunkKey(prev)


class EngineScheme(HashScheme):
    """Keys wrap an engine's own chained block hashes (vLLM, SGLang)."""

    engine_provided = True

    def iter_prefix_keys(self, ns: Namespace, tokens: npt.NDArray[np.uint32]) -> Iterator[ChunkKey]:
        raise InvalidInput(
            f"namespace scheme {self.name!r} takes the engine's block hashes "
            "(engine_prefix_keys), not token ids"
        )


class VLLMScheme(EngineScheme):
    name = "vllm"


class SGLangScheme(EngineScheme):
    name = "sglang"


_SCHEMES: dict[str, HashScheme] = {}


def register_scheme(scheme: HashScheme) -> None:
    """Add a hash scheme to the registry; names are unique."""
    if scheme.name in _SCHEMES:
        raise InvalidInput(f"hash scheme {scheme.name!r} is already registered")
    _SCHEMES[scheme.name] = scheme


def scheme_names() -> list[str]:
    """The registered hash schemes' names, sorted."""
    return sorted(_SCHEMES)


def get_scheme(name: str) -> HashScheme:
    try:
        return _SCHEMES[name]
    except KeyError:
        raise UnknownName(f"unknown hash scheme {name!r}; known: {sorted(_SCHEMES)}") from None


for _scheme in (Sha256ChainScheme(), VLLMScheme(), SGLangScheme()):
    register_scheme(_scheme)


def iter_prefix_keys(ns: Namespace, tokens: TokenInput) -> Iterator[ChunkKey]:
    """Lazily yield prefix keys, so a lookup can stop hashing at its first miss."""
    return get_scheme(ns.scheme).iter_prefix_keys(ns, as_token_array(tokens))


def prefix_keys(ns: Namespace, tokens: TokenInput) -> list[ChunkKey]:
    """The chained prefix key of every full chunk of ``tokens``.

    Raises:
        InvalidInput: bad tokens, or the namespace uses engine-provided hashes.
    """
    return list(iter_prefix_keys(ns, tokens))


def content_key(ns: Namespace, tokens: TokenInput) -> ChunkKey:
    """Position-independent key of a chunk-cache (e.g. a RAG passage).

    SHA-256(domain || ns.id || u32le(n) || tokens as u32le), for any n >= 1.
    """
    arr = as_token_array(tokens)
    if arr.size == 0:
        raise InvalidInput("a chunk-cache needs at least one token")
    h = hashlib.sha256(CONTENT_DOMAIN + ns.id + struct.pack("<I", arr.size))
    h.update(arr.data.cast("B"))
    return ChunkKey(h.digest())


def _engine_hash_bytes(value: EngineHash) -> bytes:
    if isinstance(value, bool):
        raise InvalidInput("an engine block hash cannot be a bool")
    if isinstance(value, bytes):
        tag, raw = b"\x01", value
    elif isinstance(value, str):
        tag, raw = b"\x02", value.encode("utf-8")
    elif isinstance(value, int):
        try:
            tag, raw = b"\x03", value.to_bytes(32, "little", signed=True)
        except OverflowError:
            raise InvalidInput("an integer engine block hash must fit in 256 signed bits") from None
    else:
        raise InvalidInput(f"engine block hash must be bytes, str or int, got {type(value).__name__}")
    if not raw:
        raise InvalidInput("an engine block hash cannot be empty")
    return tag + struct.pack("<I", len(raw)) + raw


def engine_prefix_keys(ns: Namespace, block_hashes: Sequence[EngineHash], block_size: int) -> list[ChunkKey]:
    """Keys for the full chunks covered by an engine's chained block hashes.

    The engine's hash of a block already names every token before it, so the
    key of chunk i wraps the hash of the last engine block inside chunk i:
    SHA-256(domain || ns.id || u32le(block_size) || tag || u32le(len) || hash).

    Raises:
        InvalidInput: the namespace is not engine-provided, or ``chunk_tokens``
            is not a multiple of ``block_size``, or a hash has the wrong type.
    """
    scheme = get_scheme(ns.scheme)
    if not scheme.engine_provided:
        raise InvalidInput(f"namespace scheme {ns.scheme!r} hashes tokens; use prefix_keys")
    if block_size < 1 or ns.chunk_tokens % block_size:
        raise InvalidInput(
            f"chunk_tokens {ns.chunk_tokens} must be a positive multiple of the engine block size {block_size}"
        )
    per_chunk = ns.chunk_tokens // block_size
    base = ENGINE_DOMAIN + ns.id + struct.pack("<I", block_size)
    return [
        ChunkKey(hashlib.sha256(base + _engine_hash_bytes(block_hashes[i])).digest())
        for i in range(per_chunk - 1, len(block_hashes), per_chunk)
    ]

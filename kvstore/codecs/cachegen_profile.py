"""Per-model CacheGen distribution profiles: symbol tables shared by every chunk.

A 256-token chunk has only 256 symbols per (slab, channel); carrying a table
for each would cost a fifth of the container. A profile holds one table per
(slab, channel) computed from sample KV of the model, stored once as a small
msgpack blob named by its digest; chunks encoded with it reference the digest
and carry a table only for a channel whose symbols fall outside the
profile's range. Profiles change only the entropy coding: a chunk decodes to
the same values with or without one.

Blob (msgpack map, keys in this order): ``format`` ("kvstore-cachegen-profile"),
``version`` (1), ``level``, ``layer_ramp``, ``slabs``, ``channels``, ``lo``,
``n``, ``freq`` (bytes: u8 per table, u8 per table, u16le frequencies of the
tables with n >= 2). Digest: the first 16 bytes of SHA-256 of the blob, hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgpack
import numpy as np
import numpy.typing as npt

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen_coder import quantize_chunk, rangecoder
from kvstore.codecs.cachegen_params import FREQ_TOTAL, NUM_SYMBOLS, QMAX, CachegenParams, Geometry, slab_bins
from kvstore.codecs.cachegen_ref import normalize
from kvstore.errors import CodecError, InvalidInput

FORMAT: Final = "kvstore-cachegen-profile"
VERSION: Final = 1
SUFFIX: Final = ".cgprofile"
MAX_BLOB: Final = 64 << 20
_KEYS: Final = ("format", "version", "level", "layer_ramp", "slabs", "channels", "lo", "n", "freq")


@dataclass(frozen=True, slots=True)
class CachegenProfile:
    """Shared tables for chunks of one geometry and quantization (``level``, ``layer_ramp``).

    Invariants (checked by :meth:`from_bytes`, guaranteed by :func:`build_profile`):
    ``slabs * channels`` tables; each has ``n >= 1``, ``lo + n <= 255`` and, when
    ``n >= 2``, frequencies that are all >= 1 and sum to 65536, so any symbol in
    its range can be coded. ``digest`` names :meth:`to_bytes`.
    """

    level: int
    layer_ramp: float
    slabs: int
    channels: int
    lo: bytes
    n: bytes
    freq: bytes
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.to_bytes()).digest()[:16].hex())

    def to_bytes(self) -> bytes:
        blob: bytes = msgpack.packb(
            {
                "format": FORMAT,
                "version": VERSION,
                "level": self.level,
                "layer_ramp": self.layer_ramp,
                "slabs": self.slabs,
                "channels": self.channels,
                "lo": self.lo,
                "n": self.n,
                "freq": self.freq,
            },
            use_bin_type=True,
        )
        return blob

    @classmethod
    def from_bytes(cls, blob: bytes) -> CachegenProfile:
        """Parse and validate a profile blob.

        Raises:
            CodecError: not a profile, another version, or inconsistent tables.
        """
        try:
            d = msgpack.unpackb(
                blob,
                raw=False,
                strict_map_key=True,
                max_bin_len=MAX_BLOB,
                max_array_len=0,
                max_map_len=len(_KEYS),
                max_ext_len=0,
            )
        except Exception as exc:  # noqa: BLE001  # msgpack raises many types on hostile bytes
            raise CodecError(f"malformed cachegen profile: {type(exc).__name__}: {exc}") from None
        if not isinstance(d, dict) or tuple(d) != _KEYS or d["format"] != FORMAT or d["version"] != VERSION:
            raise CodecError("not a cachegen profile of version 1")
        ints = [d[k] for k in ("level", "slabs", "channels")]
        tabs = [d[k] for k in ("lo", "n", "freq")]
        if (
            any(type(v) is not int or not 0 <= v < 1 << 30 for v in ints)
            or not all(isinstance(v, bytes) for v in tabs)
            or type(d["layer_ramp"]) is not float
        ):
            raise CodecError("cachegen profile fields have the wrong types")
        profile = cls(d["level"], d["layer_ramp"], d["slabs"], d["channels"], *tabs)
        check_tables(profile)
        return profile

    def save(self, directory: str | Path) -> Path:
        """Write the blob as ``<directory>/<digest>.cgprofile`` (atomically) and return its path."""
        path = Path(directory) / f"{self.digest}{SUFFIX}"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    def check_fits(self, geometry: Geometry, params: CachegenParams | None, error: type[Exception]) -> None:
        """Raise ``error`` unless the profile was built for this geometry (and quantization)."""
        if (self.slabs, self.channels) != (geometry.slabs, geometry.channels):
            raise error(
                f"cachegen profile {self.digest} is for {self.slabs}x{self.channels} channels, "
                f"the chunk has {geometry.slabs}x{geometry.channels}"
            )
        if params is not None and (self.level, self.layer_ramp) != (params.level, params.layer_ramp):
            raise error(
                f"cachegen profile {self.digest} was built for level {self.level}, "
                f"layer_ramp {self.layer_ramp}"
            )


def check_tables(p: CachegenProfile) -> None:
    """Raise CodecError unless ``p``'s tables satisfy the class invariants."""
    count = p.slabs * p.channels
    lo, n = np.frombuffer(p.lo, np.uint8).astype(np.int64), np.frombuffer(p.n, np.uint8).astype(np.int64)
    if count == 0 or lo.size != count or n.size != count or (n < 1).any() or (lo + n > NUM_SYMBOLS).any():
        raise CodecError("cachegen profile tables have the wrong count or a bad symbol range")
    sizes = n[n >= 2]
    if len(p.freq) != 2 * int(sizes.sum()):
        raise CodecError("cachegen profile frequencies have the wrong length")
    freq = np.frombuffer(p.freq, "<u2").astype(np.int64)
    sums = np.add.reduceat(freq, np.cumsum(sizes) - sizes) if sizes.size else freq
    if (freq < 1).any() or (sums != FREQ_TOTAL).any():
        raise CodecError("cachegen profile tables have zero frequencies or do not sum to 65536")


def _tables(counts: npt.NDArray[np.uint64], margin: int) -> tuple[bytes, bytes, bytes]:
    """Smoothed tables over each channel's seen range widened by ``margin``: counts + 1, normalized."""
    lo_out, n_out, freq = bytearray(), bytearray(), bytearray()
    for row in counts:
        seen = np.flatnonzero(row)
        first, last = (int(seen[0]), int(seen[-1])) if seen.size else (QMAX, QMAX)
        lo, hi = max(first - margin, 0), min(last + margin, NUM_SYMBOLS - 1)
        lo_out.append(lo)
        n_out.append(hi - lo + 1)
        if hi > lo:
            for f in normalize([int(c) + 1 for c in row[lo : hi + 1]]):
                freq += f.to_bytes(2, "little")
    return bytes(lo_out), bytes(n_out), bytes(freq)


def build_profile(
    samples: Iterable[tuple[U8 | bytes, ChunkLayout]], params: CachegenParams, *, margin: int = 4
) -> CachegenProfile:
    """A profile from sample chunks (any token counts) of one geometry, quantized as ``params`` says.

    Args:
        samples: (raw chunk bytes, layout) pairs, e.g. the KV of a few real prompts.
        params: the level and layer ramp the profile serves (other fields are ignored).
        margin: symbols added on each side of the range seen in the samples.
    Raises:
        InvalidInput: no samples, mixed geometries, unsupported dtype, or non-finite values.
    """
    rc = rangecoder()
    total: npt.NDArray[np.uint64] | None = None
    geometry: Geometry | None = None
    for raw, layout in samples:
        g = Geometry.of(layout, params.exact_tokens)
        if geometry is not None and (g.slabs, g.channels) != (geometry.slabs, geometry.channels):
            raise InvalidInput("cachegen profile samples must share one geometry")
        geometry = g
        q = quantize_chunk(raw, g, slab_bins(g, params), None)
        hist = np.frombuffer(rc.histogram(q.symbols, g.slabs, g.tokens_q, g.channels), "<u4")
        counts = hist.reshape(g.num_channels, NUM_SYMBOLS).astype(np.uint64)
        total = counts if total is None else total + counts
    if total is None or geometry is None:
        raise InvalidInput("a cachegen profile needs at least one sample chunk")
    lo, n, freq = _tables(total, margin)
    return CachegenProfile(params.level, params.layer_ramp, geometry.slabs, geometry.channels, lo, n, freq)


class ProfileStore:
    """Profiles by digest: the ones given, then ``<directory>/<digest>.cgprofile`` (loaded once).

    Invariants: every held profile is stored under its own digest.
    """

    def __init__(self, profiles: Iterable[CachegenProfile] = (), directory: str | None = None) -> None:
        self._profiles = {p.digest: p for p in profiles}
        self.directory = Path(directory) if directory else None

    def add(self, profile: CachegenProfile) -> None:
        self._profiles[profile.digest] = profile

    def get(self, digest: str, error: type[Exception]) -> CachegenProfile:
        """The profile named ``digest`` (a validated 32-hex-digit string).

        Raises:
            error: no such profile, or its file is not the profile it is named after.
        """
        found = self._profiles.get(digest)
        if found is not None:
            return found
        path = self.directory / f"{digest}{SUFFIX}" if self.directory else None
        if path is None or not path.is_file():
            raise error(f"cachegen profile {digest} is not available (profile_dir={self.directory})")
        try:
            profile = CachegenProfile.from_bytes(path.read_bytes())
        except (OSError, CodecError) as exc:
            raise error(f"cachegen profile {path}: {exc}") from None
        if profile.digest != digest:
            raise error(f"cachegen profile file {path} holds profile {profile.digest}")
        self._profiles[digest] = profile
        return profile

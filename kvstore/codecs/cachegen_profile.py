"""Per-model CacheGen profiles: symbol tables shared by every chunk, and a calibrated sensitivity.

A 256-token chunk has only 256 symbols per (slab, channel); carrying a table
for each would cost a fifth of the container. A profile holds one table per
(slab, channel) computed from sample KV of the model, stored once as a small
msgpack blob named by its digest; chunks encoded with it reference the digest
and carry a table only for a channel whose symbols fall outside the
profile's range. The tables change only the entropy coding: a chunk decodes
to the same values with or without them. A profile may also hold each
channel's sensitivity (``cachegen_calibrate``): the encoder then sets every
channel's step from it (``cachegen_params.step_targets``), which changes the
values; decoders never need it (the steps are in the container).

Blob (msgpack map, keys in this order): ``format`` ("kvstore-cachegen-profile"),
``version`` (1 or 2), ``level``, ``layer_ramp``, ``slabs``, ``channels``, ``lo``,
``n``, ``freq`` (bytes: u8 per table, u8 per table, u16le frequencies of the
tables with n >= 2), and in version 2 ``rope_theta`` (float) and
``sensitivity`` (float32le per table, or empty). A profile without either is
written as version 1. Version 3 adds a per-head transform
(:mod:`cachegen_transform`): ``heads``, ``head_dim``, ``forward`` and
``inverse`` (float32le ``[slabs][heads][D][D]`` each); its tables and
sensitivity are then of the transform's components. Digest: the first 16
bytes of SHA-256 of the blob, hex.
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
from kvstore.codecs import cachegen_rope as rope
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen_coder import quantize_chunk, rangecoder, token_codes
from kvstore.codecs.cachegen_params import (
    F64,
    FREQ_TOTAL,
    MAX_ROPE_THETA,
    NUM_SYMBOLS,
    QMAX,
    CachegenParams,
    Geometry,
    QuantPlan,
)
from kvstore.codecs.cachegen_ref import normalize
from kvstore.codecs.cachegen_transform import HeadTransform, forward_chunk
from kvstore.codecs.cachegen_transform import fits as transform_fits
from kvstore.errors import CodecError, InvalidInput

FORMAT: Final = "kvstore-cachegen-profile"
#: version 1: tables only; version 2: tables and a per-channel sensitivity; 3: and a per-head transform
VERSION: Final = 3
SUFFIX: Final = ".cgprofile"
MAX_BLOB: Final = 64 << 20
_KEYS_V1: Final = ("format", "version", "level", "layer_ramp", "slabs", "channels", "lo", "n", "freq")
_KEYS_V2: Final = (*_KEYS_V1, "rope_theta", "sensitivity")
_KEYS: Final = {1: _KEYS_V1, 2: _KEYS_V2, 3: (*_KEYS_V2, "heads", "head_dim", "forward", "inverse")}
#: smallest sensitivity a profile may hold (keeps every step target finite and below 1e30)
MIN_SENSITIVITY: Final = 1e-30


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
    sensitivity_bytes: bytes = b""
    rope_theta: float = 0.0
    transform: HeadTransform | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.to_bytes()).digest()[:16].hex())

    @property
    def sensitivity(self) -> F64 | None:
        """Each channel's sensitivity (float64, ``slabs * channels``), or None for a tables-only profile."""
        if not self.sensitivity_bytes:
            return None
        return np.frombuffer(self.sensitivity_bytes, "<f4").astype(np.float64)

    def to_bytes(self) -> bytes:
        v2 = bool(self.sensitivity_bytes) or self.rope_theta != 0.0
        t = self.transform
        fields: dict[str, object] = {
            "format": FORMAT,
            "version": 3 if t is not None else 2 if v2 else 1,
            "level": self.level,
            "layer_ramp": self.layer_ramp,
            "slabs": self.slabs,
            "channels": self.channels,
            "lo": self.lo,
            "n": self.n,
            "freq": self.freq,
        }
        if v2 or t is not None:
            fields["rope_theta"] = self.rope_theta
            fields["sensitivity"] = self.sensitivity_bytes
        if t is not None:
            fields.update(heads=t.heads, head_dim=t.head_dim, forward=t.forward, inverse=t.inverse)
        blob: bytes = msgpack.packb(fields, use_bin_type=True)
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
                max_map_len=len(_KEYS[VERSION]),
                max_ext_len=0,
            )
        except Exception as exc:  # noqa: BLE001  # msgpack raises many types on hostile bytes
            raise CodecError(f"malformed cachegen profile: {type(exc).__name__}: {exc}") from None
        version = d.get("version") if isinstance(d, dict) else None
        if (
            type(version) is not int
            or version not in _KEYS
            or tuple(d) != _KEYS[version]
            or d["format"] != FORMAT
        ):
            raise CodecError(f"not a cachegen profile of version 1 to {VERSION}")
        ints = [d[k] for k in ("level", "slabs", "channels", "heads", "head_dim") if k in d]
        tabs = [d[k] for k in ("lo", "n", "freq", "sensitivity", "forward", "inverse") if k in d]
        if (
            any(type(v) is not int or not 0 <= v < 1 << 30 for v in ints)
            or not all(isinstance(v, bytes) for v in tabs)
            or type(d["layer_ramp"]) is not float
            or type(d.get("rope_theta", 0.0)) is not float
        ):
            raise CodecError("cachegen profile fields have the wrong types")
        transform = None
        if version == 3:
            try:
                transform = HeadTransform(d["slabs"], d["heads"], d["head_dim"], d["forward"], d["inverse"])
            except InvalidInput as exc:
                raise CodecError(f"cachegen profile: {exc}") from None
            if d["heads"] * d["head_dim"] != d["channels"]:
                raise CodecError("cachegen profile transform does not match its channels")
        profile = cls(
            d["level"],
            d["layer_ramp"],
            d["slabs"],
            d["channels"],
            lo=d["lo"],
            n=d["n"],
            freq=d["freq"],
            sensitivity_bytes=d.get("sensitivity", b""),
            rope_theta=d.get("rope_theta", 0.0),
            transform=transform,
        )
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
        mine = (self.level, self.layer_ramp, self.rope_theta)
        if params is not None and mine != (params.level, params.layer_ramp, params.rope_theta):
            raise error(
                f"cachegen profile {self.digest} was built for level {self.level}, "
                f"layer_ramp {self.layer_ramp}, rope_theta {self.rope_theta}"
            )
        if self.transform is not None and not transform_fits(self.transform, geometry):
            raise error(f"cachegen profile {self.digest} has a transform for other heads than the chunk's")


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
    if p.rope_theta and not 1.0 < p.rope_theta <= MAX_ROPE_THETA:
        raise CodecError(f"cachegen profile rope_theta {p.rope_theta} is out of range")
    if p.sensitivity_bytes:
        w = np.frombuffer(p.sensitivity_bytes, np.uint8)
        if w.size != 4 * count:
            raise CodecError("cachegen profile sensitivity has the wrong length")
        if not (np.isfinite(sens := w.view("<f4")).all() and (sens >= MIN_SENSITIVITY).all()):
            raise CodecError(f"cachegen profile sensitivity must be finite and >= {MIN_SENSITIVITY}")


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
    samples: Iterable[tuple[U8 | bytes, ChunkLayout]],
    params: CachegenParams,
    *,
    margin: int = 4,
    sensitivity: F64 | None = None,
    transform: HeadTransform | None = None,
) -> CachegenProfile:
    """A profile from sample chunks (any token counts) of one geometry, quantized as ``params`` says
    (its ``level``, ``layer_ramp`` and ``rope_theta``: a codec uses it only with the same three; and
    its ``token_scale``: the tables fit the codec's symbols best when it matches the codec's).

    Args:
        samples: (raw chunk bytes, layout) pairs, e.g. the KV of a few real prompts.
        params: the level and layer ramp the profile serves (other fields are ignored).
        margin: symbols added on each side of the range seen in the samples.
        sensitivity: per-channel sensitivities (``slabs * channels``, from
            :func:`kvstore.codecs.cachegen_calibrate.calibrate`) that set the steps of chunks
            encoded with this profile; None keeps the steps relative to each slab's spread.
        transform: per-head transforms (:func:`kvstore.codecs.cachegen_transform.build_transform`):
            chunks encoded with this profile are quantized as the transform's components, with
            one uniform step per level (``sensitivity``, if given, scales it per component).
    Raises:
        InvalidInput: no samples, mixed geometries, unsupported dtype, non-finite values, or a
            sensitivity of the wrong size or not finite and positive.
    """
    rc = rangecoder()
    sens = b"" if sensitivity is None else _sensitivity_bytes(sensitivity)
    weights = np.frombuffer(sens, "<f4").astype(np.float64) if sens else None  # as the codec will read them
    total: npt.NDArray[np.uint64] | None = None
    geometry: Geometry | None = None
    for raw, layout in samples:
        g = Geometry.of(layout, params.exact_tokens)
        if geometry is not None and (g.slabs, g.channels) != (geometry.slabs, geometry.channels):
            raise InvalidInput("cachegen profile samples must share one geometry")
        geometry = g
        if weights is not None and weights.shape != (g.num_channels,):
            raise InvalidInput(f"cachegen sensitivity needs {g.num_channels} values, got {weights.shape}")
        plan = QuantPlan.of(g, params, weights, transform is not None)
        ts = token_codes(raw, g) if params.token_scale else None
        if transform is not None:
            if not transform_fits(transform, g):
                raise InvalidInput("cachegen profile transform does not fit the sample chunks")
            z = forward_chunk(raw, g, params.rope_theta, transform)
            q = quantize_chunk(z, g.as_float32(), plan, None, ts)
        elif rope.applies(g, params.rope_theta):
            q = quantize_chunk(rope.unrotated(raw, g, params.rope_theta), g.as_float32(), plan, None, ts)
        else:
            q = quantize_chunk(raw, g, plan, None, ts)
        hist = np.frombuffer(rc.histogram(q.symbols, g.slabs, g.tokens_q, g.channels), "<u4")
        counts = hist.reshape(g.num_channels, NUM_SYMBOLS).astype(np.uint64)
        total = counts if total is None else total + counts
    if total is None or geometry is None:
        raise InvalidInput("a cachegen profile needs at least one sample chunk")
    lo, n, freq = _tables(total, margin)
    p = params
    return CachegenProfile(
        p.level, p.layer_ramp, geometry.slabs, geometry.channels, lo, n, freq, sens, p.rope_theta, transform
    )


def _sensitivity_bytes(sensitivity: F64) -> bytes:
    w = np.asarray(sensitivity, np.float64).reshape(-1).astype("<f4")
    if not (np.isfinite(w).all() and (w >= MIN_SENSITIVITY).all()):
        raise InvalidInput(f"cachegen sensitivity must be finite and >= {MIN_SENSITIVITY}")
    return w.tobytes()


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
